"""The checks that need an NVIDIA GPU, in one run of under 8 minutes on one H100/H200.

    bash scripts/gpu_check.sh                 # or: python scripts/gpu_check.py [--only NAME,...]

Each check runs in its own process with its own time limit, so a crash, a hang or an out-of-memory
error fails that check alone; the run ends with one summary table (and `--out`, JSON). Without a
GPU it says so and exits 0. `--device cpu` runs the same checks on the CPU (what they compare
still holds there; the GPU-only parts, such as counting synchronisations, are skipped): a way to
check this script itself on a machine without a GPU.

Checks:
  parity          parity_small.pt on the GPU: the UNet within 1e-5 of the original's numbers with TF32
                  off (exact float32); its error with TF32 on, reported
  flash_attention the fused kernel (flash-attention backend forced) against the einsum path, forward
                  and backward, bf16 and fp16, at the published model's head widths (128, 192, 256)
  sampling        DDPM, DDIM and DPM-Solver++ twice under one seed: bit-identical
  train_fp32/bf16/fp16  a tiny TrainLoop, 3 steps, saved and resumed (fp16: the GradScaler state
                  comes back), counting host-device synchronisations per step
                  (torch.cuda.set_sync_debug_mode("warn")); none are expected between log lines
  ddp_gloo        two gloo ranks on one GPU, --microbatch --channels_last --compile: identical weights
  benchmark       scripts/benchmark.py, config 128 at batch 8 and 64, with TF32 off and on
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BUDGET_S = 470.0  # the whole run, under 8 minutes
# (name, time limit in seconds); run in this order, the most telling first
CHECKS = [
    ("parity", 60),
    ("flash_attention", 60),
    ("sampling", 60),
    ("train_fp32", 60),
    ("train_bf16", 60),
    ("train_fp16", 60),
    ("ddp_gloo", 200),  # two processes compile the tiny UNet
    ("benchmark", 240),
]
TINY = dict(timestep_respacing="10", ssl_dim=64)  # over ModelConfig's "tiny" preset


# ----------------------------------------------------------------------------- helpers


def _tiny(device, seed: int = 0, **extra):
    """A tiny representation-conditioned UNet with random (non-zero) weights, and its diffusion."""
    import torch

    from guided_diffusion_rcdm import ModelConfig

    torch.manual_seed(seed)
    model, diffusion = ModelConfig.preset("tiny", **{**TINY, **extra}).build()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0.0, 0.05)
    return model.to(device), diffusion


def _max_err(a, b) -> float:
    return float((a.double().cpu() - b.double().cpu()).abs().max())


# ----------------------------------------------------------------------------- checks


def check_parity(device) -> tuple[bool, str]:
    import torch

    from guided_diffusion_rcdm.precision import set_fp32_math
    from guided_diffusion_rcdm.script_util import create_model_and_diffusion, model_and_diffusion_defaults

    ref = torch.load(REPO / "tests" / "reference" / "parity_small.pt", weights_only=True)
    args = {**model_and_diffusion_defaults(), **ref["config"]}
    model, diffusion = create_model_and_diffusion(**args, G_shared=False, feat_cond=True, ssl_dim=ref["ssl_dim"])
    model.load_state_dict(ref["state_dict"], strict=True)
    model.eval().to(device)
    x, t, feat = (ref[k].to(device) for k in ("x", "t", "feat"))
    errors = {}
    for tf32 in (False, True):
        set_fp32_math(tf32)
        with torch.no_grad():
            out = {"model": model(x, t, feat=feat),
                   "q_sample": diffusion.q_sample(ref["x_start"].to(device), t, noise=ref["noise"].to(device))}
            pmv = diffusion.p_mean_variance(model, x, t, clip_denoised=True, model_kwargs={"feat": feat})
        out["p_mean"], out["p_log_variance"] = pmv["mean"], pmv["log_variance"]
        want = {"model": ref["model_out_raw"], "q_sample": ref["q_sample"], "p_mean": ref["p_mean"],
                "p_log_variance": ref["p_log_variance"]}
        errors[tf32] = {k: _max_err(out[k], want[k]) for k in want}
    set_fp32_math(False)
    exact, fast = errors[False], errors[True]
    ok = exact["model"] <= 1e-5
    detail = ("TF32 off: " + ", ".join(f"{k} {v:.1e}" for k, v in exact.items())
              + f" (model <= 1e-5: {'yes' if ok else 'NO'}); TF32 on: model {fast['model']:.1e}, "
              f"p_mean {fast['p_mean']:.1e}")
    return ok, detail


def check_flash_attention(device) -> tuple[bool, str]:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from guided_diffusion_rcdm.precision import set_fp32_math
    from guided_diffusion_rcdm.unet import AttentionBlock

    set_fp32_math(False)
    # the published 128x128 model: 4 heads at 512, 768 and 1024 channels, on 32², 16² and 8² tokens
    cases = [(128, 32), (192, 16), (256, 8)]
    lines, ok = [], True
    for width, side in cases:
        torch.manual_seed(width)
        block = AttentionBlock(4 * width, num_heads=4).to(device)
        with torch.no_grad():
            for p in block.parameters():
                if p.ndim > 1:  # the output projection starts at zero, which would hide everything
                    p.normal_(0.0, 0.02)
        x = torch.randn(2, 4 * width, side, side, device=device)

        def run(fused, dtype):
            block.attention.fused = fused
            xi = x.clone().requires_grad_(True)
            block.zero_grad(set_to_none=True)
            if dtype is None:
                out = block(xi)
            else:
                with torch.autocast(device.type, dtype=dtype):
                    if fused:
                        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # the flash kernel or an error
                            out = block(xi)
                    else:
                        out = block(xi)
            out.float().square().mean().backward()
            return out.float().detach(), xi.grad.float(), block.qkv.weight.grad.float()

        reference = run(False, None)  # float32, einsum
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            try:
                fused = run(True, dtype)
            except RuntimeError as err:
                ok = False
                lines.append(f"{name} width {width}: no flash kernel ({str(err).splitlines()[0][:80]})")
                continue
            einsum = run(False, dtype)
            # the fused kernel may be no farther from float32 than the einsum path in the same precision
            errs = [(_max_err(f, r), _max_err(e, r)) for f, e, r in zip(fused, einsum, reference)]
            good = all(ef <= 2 * ee + 1e-3 * float(r.abs().max()) for (ef, ee), r in zip(errs, reference))
            ok &= good
            lines.append(f"{name} w{width}: out {errs[0][0]:.1e}/{errs[0][1]:.1e} dx {errs[1][0]:.1e}/"
                         f"{errs[1][1]:.1e}{'' if good else ' FAIL'}")
        block.attention.fused = None
    return ok, "fused/einsum error vs fp32; " + "; ".join(lines)


def check_sampling(device) -> tuple[bool, str]:
    import torch

    from guided_diffusion_rcdm.precision import set_fp32_math
    from guided_diffusion_rcdm.samplers import sample_images

    set_fp32_math(False)
    model, diffusion = _tiny(device)
    model.eval()
    feat = torch.randn(4, 64, device=device)
    same = {}
    for sampler in ("ddpm", "ddim", "dpm++"):
        runs = []
        for _ in range(2):
            torch.manual_seed(7)
            runs.append(sample_images(model, diffusion, (4, 3, 32, 32), sampler=sampler, eta=0.5,
                                      model_kwargs={"feat": feat}, device=device))
        same[sampler] = torch.equal(runs[0], runs[1])
    return all(same.values()), ", ".join(f"{k} {'identical' if v else 'DIFFERENT'}" for k, v in same.items())


def _check_train(device, precision: str) -> tuple[bool, str]:
    import warnings

    import torch

    from guided_diffusion_rcdm import logger
    from guided_diffusion_rcdm.precision import set_fp32_math
    from guided_diffusion_rcdm.train_util import TrainLoop

    set_fp32_math(False, fixed_shapes=True)
    out = tempfile.mkdtemp(prefix=f"gpu_check_{precision}_")
    logger.configure(dir=out, format_strs="log")
    batch = torch.rand(4, 3, 32, 32) * 2 - 1
    cond = {"feat": torch.randn(4, 64)}

    def make(seed):
        model, diffusion = _tiny(device, seed=seed, timestep_respacing="")
        return TrainLoop(model=model, diffusion=diffusion, data=None, batch_size=4, microbatch=2, lr=1e-4,
                         ema_rate="0.9", log_interval=1000, save_interval=1000, resume_checkpoint="",
                         precision=precision, progress=False, out_dir=out, seed=0)

    loop = make(0)
    loop.run_step(batch, cond)  # the first step allocates optimizer state and autocast caches
    syncs, where = [], ""
    for _ in range(2):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loop.run_step(batch, cond)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        found = [w for w in caught if "synchroniz" in str(w.message)]
        syncs.append(len(found))
        if found and not where:
            where = f" (first: {Path(found[0].filename).name}:{found[0].lineno})"
    row = loop._write_logs()
    loop.save()
    scale = loop.scaler.get_scale() if loop.scaler is not None else None
    resumed = make(1)
    logger.reset()
    problems = []
    if resumed.step != 3:
        problems.append(f"resumed at step {resumed.step}, not 3")
    if not all(torch.equal(a, b) for a, b in zip(resumed.params, loop.params)):
        problems.append("resumed weights differ")
    if scale is not None and resumed.scaler.get_scale() != scale:
        problems.append(f"loss scale {resumed.scaler.get_scale()} after resume, {scale} saved")
    if device.type == "cuda" and any(syncs):
        problems.append(f"{syncs} synchronisations in steps 2 and 3{where}")
    loss = row.get("loss", float("nan"))
    counted = f"syncs per step {syncs}" if device.type == "cuda" else "syncs not counted on a CPU"
    detail = f"3 steps, loss {loss:.4f}, {counted}, resumed at step {resumed.step}"
    if scale is not None:
        detail += f", loss scale 2^{int(round(math.log2(scale)))} kept"
    return not problems, detail + ("; " + "; ".join(problems) if problems else "")


def check_train_fp32(device):
    return _check_train(device, "fp32")


def check_train_bf16(device):
    return _check_train(device, "bf16")


def check_train_fp16(device):
    if device.type != "cuda":
        return True, "skipped: fp16 training needs a GPU"
    return _check_train(device, "fp16")


DDP_WORKER = r"""
import sys
import torch
from guided_diffusion_rcdm import dist_util, logger
from guided_diffusion_rcdm.train_util import TrainLoop
sys.path.insert(0, sys.argv[2])
from scripts.gpu_check import _tiny

out = sys.argv[1]
dist_util.setup_dist()
rank = dist_util.get_rank()
logger.configure(dir=out, format_strs="log")
model, diffusion = _tiny(dist_util.dev(), seed=rank, timestep_respacing="")
g = torch.Generator().manual_seed(rank)

def batches():
    while True:
        yield torch.rand(6, 3, 32, 32, generator=g) * 2 - 1, {"feat": torch.randn(6, 64, generator=g)}

loop = TrainLoop(model=model, diffusion=diffusion, data=batches(), batch_size=6, microbatch=4, lr=1e-4,
                 ema_rate="0.9", log_interval=3, save_interval=1000, resume_checkpoint="", max_steps=3,
                 progress=False, out_dir=out, seed=0, channels_last=True, compile=True)
loop.run_loop()
torch.save([p.detach().cpu() for p in model.parameters()] + [p.cpu() for p in loop.ema_params[0]],
           f"{out}/rank{rank}.pt")
dist_util.cleanup()
"""


def check_ddp_gloo(device) -> tuple[bool, str]:
    import socket

    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mkdtemp(prefix="gpu_check_ddp_")
    env = dict(os.environ, RCDM_DIST_BACKEND="gloo", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="2", PYTHONPATH=str(REPO))
    if device.type == "cuda":  # both ranks on the first GPU this process sees
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
    procs = [subprocess.Popen([sys.executable, "-c", DDP_WORKER, out, str(REPO)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        tail = next(o for p, o in zip(procs, outputs) if p.returncode).strip().splitlines()[-3:]
        return False, "a rank failed: " + " | ".join(tail)
    r0, r1 = (torch.load(Path(out) / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    same = all(torch.equal(a, b) for a, b in zip(r0, r1))
    return same, ("3 steps, batch 6 in microbatches of 4 and 2, channels-last, compiled: weights and EMA "
                  + ("identical on both ranks" if same else "DIFFER between the ranks"))


def check_benchmark(device) -> tuple[bool, str]:
    if device.type != "cuda":
        return True, "skipped: measured on a GPU only"
    out = Path(tempfile.mkdtemp(prefix="gpu_check_bench_"))
    rows = []
    for tf32 in (False, True):
        path = out / f"bench_tf32_{int(tf32)}.json"
        cmd = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--configs", "128", "--batch_sizes", "8,64",
               "--skip", "sampling,training", "--iters", "2", "--warmup", "1", "--device", "cuda",
               "--out", str(path)] + (["--tf32"] if tf32 else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            return False, f"benchmark{' --tf32' if tf32 else ''} failed: " + proc.stderr.strip()[-300:]
        report = json.loads(path.read_text())
        for r in report["forward"]:
            if tf32 and r["variant"].startswith(("bf16", "fp16")):
                continue  # TF32 changes float32 arithmetic only
            rows.append(f"b{r['batch_size']} {r['variant']}{' tf32' if tf32 else ''} {r['images_per_s']:.0f}")
    return True, "UNet forward 128x128, images/s: " + "; ".join(rows)


# ----------------------------------------------------------------------------- runner


def run_one(name: str, device_name: str, result_path: str) -> None:
    """Run one check in this process and write `{ok, detail}` to `result_path`."""
    import torch

    device = torch.device(device_name)
    try:
        ok, detail = globals()[f"check_{name}"](device)
    except Exception as exc:  # reported in the table, not as a traceback in the middle of the run
        ok, detail = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        traceback.print_exc()
    Path(result_path).write_text(json.dumps({"ok": bool(ok), "detail": detail}))


def format_table(results: list[dict]) -> str:
    header = ("check", "result", "seconds", "detail")
    rows = [header] + [(r["check"], r["result"], f"{r['seconds']:.0f}", r["detail"]) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated checks to run (default: all)")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to try this script itself")
    parser.add_argument("--out", default="gpu_check.json", help="where to write the results as JSON")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run")
    parser.add_argument("--run", default="", help=argparse.SUPPRESS)  # one check, in a child process
    parser.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        run_one(args.run, args.device, args.result)
        return 0

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible here (torch.cuda.is_available() is False): nothing to check. "
              "Run it on a machine with an NVIDIA GPU (or try the script with --device cpu).")
        return 0
    names = [n for n, _ in CHECKS]
    chosen = [n for n in args.only.split(",") if n] or names
    unknown = [n for n in chosen if n not in names]
    if unknown:
        print(f"gpu_check: unknown --only {','.join(unknown)}; choose from {', '.join(names)}", file=sys.stderr)
        return 2
    device_text = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU (trying the script)"
    print(f"gpu_check on {device_text}, torch {torch.__version__}: {len(chosen)} checks, budget {args.budget:.0f} s")
    on_gpu = args.device.startswith("cuda")
    deadline = time.monotonic() + (args.budget if on_gpu else 20 * args.budget)
    slower = 1 if on_gpu else 10  # the limits are a GPU's; a CPU trying the script gets more time
    results = []
    logs = Path(tempfile.mkdtemp(prefix="gpu_check_logs_"))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name, limit in CHECKS:
        if name not in chosen:
            continue
        left = deadline - time.monotonic()
        if left < 10:
            results.append({"check": name, "result": "skipped", "seconds": 0.0, "detail": "out of time budget"})
            continue
        result_path, log_path = logs / f"{name}.json", logs / f"{name}.log"
        start = time.monotonic()
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, __file__, "--run", name, "--device", args.device,
                                     "--result", str(result_path)], stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                proc.wait(timeout=min(limit * slower, left))
                timed_out = False
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                timed_out = True
        seconds = time.monotonic() - start
        if timed_out:
            row = {"result": "timeout", "detail": f"stopped after {seconds:.0f} s (log: {log_path})"}
        elif result_path.is_file():
            found = json.loads(result_path.read_text())
            row = {"result": "pass" if found["ok"] else "FAIL", "detail": found["detail"]}
        else:
            tail = log_path.read_text().strip().splitlines()[-1:] or ["no output"]
            row = {"result": "crash", "detail": f"exit {proc.returncode}: {tail[0][:200]} (log: {log_path})"}
        results.append({"check": name, "seconds": seconds, **row})
        print(f"  {name}: {row['result']} ({seconds:.0f} s)", flush=True)
    print()
    print(format_table(results))
    Path(args.out).write_text(json.dumps({"device": device_text, "torch": torch.__version__, "results": results},
                                         indent=2))
    print(f"\nresults written to {args.out}")
    return 0 if all(r["result"] in ("pass", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
