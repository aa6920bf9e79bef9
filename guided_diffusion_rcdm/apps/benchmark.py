"""Speed measurements of the UNet, sampling and training, for `scripts/benchmark.py`.

Every figure is measured against a baseline run in the same process: the plain fp32 eager forward
written as the original does it (einsum attention, contiguous tensors). Variants add bf16/fp16
autocast, channels-last, fused attention and `torch.compile`. FLOPs come from torch's FLOP counter
on one forward, so achieved FLOP/s can be compared with the hardware's peak.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import resource
import statistics
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..cli.flags import Flag, Parser, add_flags
from ..cli.flags import parse_args as parse_flags
from ..cli.policy import flag_message
from ..errors import UsageError
from ..fileio import atomic_write_text, check_out_dir
from ..precision import (
    auto_speed,
    cpu_features,
    default_device,
    device_problem,
    fp32_math_mode,
    prepare_model,
    set_fp32_math,
)
from ..samplers import sample_images
from ..config import ModelConfig, Range

# The published 128x128 configuration, a small one that trains on a laptop, and a tiny one.
CONFIGS: dict[str, ModelConfig] = {
    "128": ModelConfig.preset("published_128"),
    "small": ModelConfig.preset("published_128", image_size=64, num_channels=64, channel_mult="1,2,2,2",
                                attention_resolutions="16,8"),
    "tiny": ModelConfig.preset("tiny", resblock_updown=True, diffusion_steps=1000, ssl_dim=64),
}


@dataclass
class Variant:
    """One way of running the UNet."""

    name: str
    precision: str = "fp32"
    channels_last: bool = False
    fused_attention: bool | None = False
    compile: bool = False


BASELINE = Variant("baseline")


def auto_variant(device: torch.device) -> Variant:
    """What `--precision auto` picks on this device, named "auto=" + what it is (e.g. auto=fp32+sdpa)."""
    choice = auto_speed(device)
    fused = choice.fused_attention if choice.precision == "fp32" else True  # fused by default in bf16/fp16
    name = "+".join([choice.precision] + ["sdpa"] * bool(fused) + ["cl"] * choice.channels_last)
    return Variant(f"auto={name}", precision=choice.precision, channels_last=choice.channels_last,
                   fused_attention=choice.fused_attention)


def default_variants(device: torch.device, compile: bool) -> list[Variant]:
    variants = [
        BASELINE,
        Variant("fp32", fused_attention=None),
        Variant("fp32+sdpa+cl", channels_last=True, fused_attention=True),
        Variant("bf16+sdpa+cl", precision="bf16", channels_last=True, fused_attention=True),
        auto_variant(device),
    ]
    if device.type == "cuda":
        variants.append(Variant("fp16+sdpa+cl", precision="fp16", channels_last=True, fused_attention=True))
        # CUDA's GroupNorm has no channels-last kernel: measure what channels-last costs or buys there
        variants.append(Variant("bf16+sdpa", precision="bf16", fused_attention=True))
    if compile:
        variants.append(
            Variant("bf16+sdpa+cl+compile", precision="bf16", channels_last=True, fused_attention=True, compile=True)
        )
    return variants


@dataclass
class Result:
    config: str
    variant: str
    batch_size: int
    images_per_s: float
    s_per_forward: float
    gflop_per_image: float
    achieved_tflops: float
    utilisation: float = 0.0  # achieved / the device's measured peak in the variant's precision
    speedup_vs_baseline: float = 1.0
    extra: dict = field(default_factory=dict)


def build(config: str, device: torch.device, seed: int = 0):
    """The UNet (random weights, eval mode) and diffusion of a named configuration."""
    cfg = CONFIGS[config]
    flags, ssl_dim = cfg.flags(), cfg.ssl_dim
    torch.manual_seed(seed)
    model, diffusion = cfg.build()
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised layers would make the output trivial
            p.mul_(0).add_(torch.randn_like(p) * 0.02)
    return model.to(device).eval(), diffusion, flags, ssl_dim


def _inputs(batch: int, image_size: int, ssl_dim: int, device, channels_last: bool):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, image_size, image_size, generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    feat = torch.randn(batch, ssl_dim, generator=g).to(device)
    return x, t, feat


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds per call after `warmup` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_flops(model: torch.nn.Module, inputs) -> float:
    """FLOPs of one forward (multiply-adds counted as two), from torch's FLOP counter."""
    x, t, feat = inputs
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t, feat=feat)
    return float(counter.get_total_flops())


def variant_model(model: torch.nn.Module, variant: Variant, device: torch.device) -> torch.nn.Module:
    """`model` set up as `variant` says (in place: memory format and attention kernel), wrapped
    for precision and compilation (compiled with its weights frozen in eval mode)."""
    model.set_fused_attention(variant.fused_attention)
    model.to(memory_format=torch.channels_last if variant.channels_last else torch.contiguous_format)
    return prepare_model(
        model, precision=variant.precision, device=device, compile=variant.compile, freeze=not model.training
    )


PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def peak_tflops(device: torch.device, precision: str, seconds: float = 2.0, small: bool = False) -> float:
    """The device's practical peak in `precision`: the better TFLOP/s of a large square matmul
    and of a 3x3 convolution (256 channels, 64x64, batch 8, channels-last), the UNet's main op.

    Model FLOP utilisation is a forward's achieved FLOP/s over this figure (a datasheet peak is
    higher). NaN for fp16 on a CPU, which has no fast fp16 path. `small`: operations 64x smaller
    (a quick figure, for smoke runs: emulated bf16 takes a minute on the full-size ones).
    """
    dtype = PEAK_DTYPES[precision]
    if device.type == "cpu" and dtype == torch.float16:
        return float("nan")
    n = (8192 if device.type == "cuda" else 2048) // (4 if small else 1)
    batch, size = (1, 32) if small else (8, 64)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    x = torch.randn(batch, 256, size, size, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    ops = [
        (lambda: a @ b, 2 * n**3),
        (lambda: torch.nn.functional.conv2d(x, w, padding=1), 2 * batch * 256 * 256 * 9 * size * size),
    ]
    best = 0.0
    with torch.no_grad():
        for op, flops in ops:
            op()  # warm up
            _sync(device)
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / 2 or calls < 2:
                op()
                calls += 1
                if device.type == "cuda" and calls % 10 == 0:
                    _sync(device)
            _sync(device)
            best = max(best, flops * calls / (time.perf_counter() - start) / 1e12)
    return best


def time_in_turns(calls: dict[str, Callable[[], object]], device: torch.device, warmup: int, iters: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in turns (one call of each per round).

    Taking turns spreads any slow spell of the machine (another process, clock changes) over every
    variant alike, so the ratios between them hold even when the absolute times drift.
    """
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(iters):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def variant_runners(model: torch.nn.Module, variants: list[Variant], device: torch.device) -> dict[str, torch.nn.Module]:
    """Each variant's runnable model, by name, so that the variants can be timed in turns.

    Each (memory format, attention kernel) pair gets its own copy of `model` (the same weights);
    `model` itself serves the first pair.
    """
    copies: dict[tuple, torch.nn.Module] = {}
    runners = {}
    for variant in variants:
        key = (variant.channels_last, variant.fused_attention)
        if key not in copies:
            copies[key] = model if not copies else copy.deepcopy(model)
        runners[variant.name] = variant_model(copies[key], variant, device)
    return runners


def bench_forward(
    config: str,
    variants: list[Variant],
    batch_sizes: list[int],
    device: torch.device,
    warmup: int,
    iters: int,
    peaks: dict[str, float] | None = None,
) -> list[Result]:
    """UNet forward throughput of each variant, relative to the baseline at the same batch size.

    The variants are timed in turns (see `time_in_turns`); compiled variants are compiled first.
    """
    results = []
    peaks = peaks or {v.precision: peak_tflops(device, v.precision) for v in variants}
    model, _, flags, ssl_dim = build(config, device)
    for batch in batch_sizes:
        model.set_fused_attention(False)
        model.to(memory_format=torch.contiguous_format)
        flops = forward_flops(model, _inputs(batch, flags["image_size"], ssl_dim, device, False))
        calls = _forward_calls(model, variants, device, batch, flags["image_size"], ssl_dim)
        seconds = time_in_turns(calls, device, warmup=warmup, iters=iters)
        baseline_s = seconds.get(BASELINE.name)
        for variant in variants:
            s_ = seconds[variant.name]
            results.append(
                Result(
                    config=config,
                    variant=variant.name,
                    batch_size=batch,
                    images_per_s=batch / s_,
                    s_per_forward=s_,
                    gflop_per_image=flops / batch / 1e9,
                    achieved_tflops=flops / s_ / 1e12,
                    utilisation=flops / s_ / 1e12 / peaks[variant.precision],
                    speedup_vs_baseline=(baseline_s / s_) if baseline_s else 1.0,
                )
            )
        del calls
        gc.collect()
    return results


def _forward_calls(model, variants, device, batch: int, image_size: int, ssl_dim: int) -> dict[str, Callable]:
    """One batched forward per variant, ready to time (compiled variants already compiled)."""
    if any(v.compile for v in variants):
        torch._dynamo.reset()  # compile each batch size afresh, not as a dynamic-shape graph
    runners = variant_runners(model, variants, device)
    calls = {}
    for variant in variants:
        x, t, feat = _inputs(batch, image_size, ssl_dim, device, variant.channels_last)

        def step(fast=runners[variant.name], x=x, t=t, feat=feat):
            with torch.no_grad():
                return fast(x, t, feat=feat)

        if variant.compile:
            step()  # compiles
        calls[variant.name] = step
    return calls


def bench_sampling(
    config: str, variants: list[Variant], device: torch.device, batch: int, measure: bool
) -> list[dict]:
    """Seconds per sampled image for DDPM with 100 steps and DPM-Solver++ with 20.

    With `measure`, the samplers run for real (once each); otherwise the time is the batched
    forward, timed in turns, times the number of model calls (sampling is dominated by them), and
    says so.
    """
    model, diffusion, flags, ssl_dim = build(config, device)
    size = flags["image_size"]
    samplers = (("ddpm", 100), ("dpm++", 20))
    if measure:
        x, t, feat = _inputs(batch, size, ssl_dim, device, False)
        runners = variant_runners(model, variants, device)
        for variant in variants:
            if variant.compile:
                with torch.no_grad():
                    runners[variant.name](x, t, feat=feat)  # compiles outside the timing
        calls = {
            f"{name}|{sampler}": (lambda fast=fast, sampler=sampler, steps=steps: sample_images(
                fast, diffusion, (batch, 3, size, size), sampler=sampler, steps=steps,
                model_kwargs={"feat": feat}, device=device))
            for name, fast in runners.items() for sampler, steps in samplers
        }
        seconds = time_in_turns(calls, device, warmup=0, iters=1)
    else:
        forward = time_in_turns(_forward_calls(model, variants, device, batch, size, ssl_dim), device, 1, 2)
        seconds = {f"{name}|{sampler}": s_ * steps for name, s_ in forward.items() for sampler, steps in samplers}
    rows = []
    for variant in variants:
        for sampler, steps in samplers:
            rows.append(dict(
                config=config, variant=variant.name, sampler=f"{sampler}-{steps}", batch_size=batch,
                s_per_image=seconds[f"{variant.name}|{sampler}"] / batch,
                how="measured" if measure else f"estimated: {steps} x batched forward",
            ))
    gc.collect()
    return rows


def bench_training(
    config: str, variants: list[Variant], device: torch.device, batch: int, iters: int
) -> list[dict]:
    """Training images/s: forward, diffusion loss, backward and an AdamW step."""
    rows = []
    model, diffusion, flags, ssl_dim = build(config, device)
    model.train()
    for variant in variants:
        if variant.compile or variant.precision == "fp16":
            continue  # fp16 training needs loss scaling: measured by the training loop itself
        fast = variant_model(model, variant, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x, _, feat = _inputs(batch, flags["image_size"], ssl_dim, device, variant.channels_last)
        t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = diffusion.training_losses(fast, x, t, model_kwargs={"feat": feat})["loss"].mean()
            loss.backward()
            opt.step()

        seconds = time_call(step, device, warmup=1, iters=iters)
        rows.append(dict(config=config, variant=variant.name, batch_size=batch, images_per_s=batch / seconds))
        gc.collect()
    return rows


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: GPU allocations on CUDA, the process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def as_dicts(results: list[Result]) -> list[dict]:
    return [asdict(r) for r in results]


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table of `rows` restricted to `columns`."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command


BENCHMARK_DOC = r"""Benchmark the UNet: forward throughput, time per sampled image, training speed, peak memory.

Every figure is compared with a baseline run in the same process (the original's fp32 eager
forward: einsum attention, contiguous tensors); variants are timed in turns. The device's peak per
precision is measured first, so each forward also gets its utilisation of that peak, and the
ceiling (every precision at 100% of its peak, as a multiple of the baseline) is printed.
Prints tables and writes JSON. See docs/speed.md for figures and what the flags mean.

    python scripts/benchmark.py                          # 128x128 and small configs, batch 1 and 8
    python scripts/benchmark.py --configs small --compile
    python scripts/benchmark.py --smoke                  # a tiny config, one iteration (the tests run this)
"""

# The benchmark's own flags; --device and --tf32 are the declared ones (`cli.flags`).
BENCHMARK_FLAGS = (
    Flag("configs", "128,small", str, "comma-separated: " + ", ".join(CONFIGS)),
    Flag("batch_sizes", "1,8", str, "forward batch sizes"),
    Flag("sample_batch", 8, int, "batch size for the sampling figures", range=Range(1, 4096)),
    Flag("train_batch", 8, int, "batch size for the training figures", range=Range(1, 4096)),
    Flag("iters", 3, int, "timed iterations per figure (median)", range=Range(1, 100000)),
    Flag("warmup", 1, int, "untimed iterations first", range=Range(0, 100000)),
    Flag("compile", False, bool, "also time torch.compile variants"),
    Flag("measure_sampling", False, bool, "run the samplers for real (default: model calls x measured forward time)"),
    Flag("skip", "", str, "comma-separated parts to skip: forward, sampling, training"),
    Flag("threads", None, int, "torch CPU threads", range=Range(1, 4096)),
    Flag("out", "benchmark.json", str, "where to write the JSON results"),
    Flag("smoke", False, bool, "tiny config, one iteration: checks the script runs"),
)


def create_argparser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=BENCHMARK_DOC)
    for flag in BENCHMARK_FLAGS:
        flag.add_to(parser)
    add_flags(parser, "device", "tf32", helps={"device": "cpu or cuda (default: cuda when available)"})
    return parser


def parse_args(argv=None, prog: str | None = None) -> argparse.Namespace:
    parser = create_argparser(prog)
    return parser.parse_args(argv)


def ceiling_note(rows: list[dict], peaks: dict[str, float]) -> str:
    """What the hardware allows: each precision at 100% of its peak, as a multiple of the baseline."""
    lines = []
    for row in rows:
        if row["variant"] == BASELINE.name:
            ceilings = ", ".join(f"{p} {peaks[p] / row['achieved_tflops']:.2f}x" for p in peaks if peaks[p] == peaks[p])
            lines.append(f"batch {row['batch_size']}: the baseline runs at {row['utilisation']:.0%} of the fp32 "
                         f"peak; a forward at 100% of the peak would be {ceilings} the baseline")
    return "\n".join(lines)


def main(argv=None, prog: str | None = None) -> int:
    """`rcdm benchmark` / scripts/benchmark.py: the exit status."""
    parser = create_argparser(prog)
    args = parse_flags(parser, argv)

    def refuse(message: str) -> int:
        print(f"{parser.prog}: error: {flag_message(message, parser)}", file=sys.stderr, flush=True)
        return 2

    smoke_sets = ("configs", "batch_sizes", "iters", "warmup", "sample_batch", "train_batch", "measure_sampling")
    overridden = [f"--{name}" for name in smoke_sets if name in args.explicit]
    if args.smoke and overridden:
        return refuse(f"--smoke sets its own {', '.join(overridden)}: leave {'it' if len(overridden) == 1 else 'them'} "
                      "out, or drop --smoke")
    if args.smoke:
        args.configs, args.batch_sizes, args.iters, args.warmup = "tiny", "2", 1, 0
        args.sample_batch, args.train_batch, args.measure_sampling = 2, 2, False
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        return refuse(f"--configs {args.configs!r}: choose from {', '.join(CONFIGS)}")
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        batch_sizes = []
    if not batch_sizes or min(batch_sizes) < 1:
        return refuse(f"--batch_sizes {args.batch_sizes!r}: comma-separated positive integers, e.g. 1,8")
    skip = set(args.skip.split(",")) - {""}
    if skip - {"forward", "sampling", "training"}:
        return refuse(f"--skip {args.skip!r}: comma-separated parts among forward, sampling, training")
    try:
        check_out_dir(os.path.dirname(os.path.abspath(args.out)), "--out's folder")
    except UsageError as err:
        return refuse(str(err))
    if os.path.isdir(args.out):
        return refuse(f"--out {args.out}: is a folder; name the JSON file to write")
    try:
        device = torch.device(args.device) if args.device else default_device()
    except RuntimeError:
        return refuse(f"--device {args.device!r} is not a device name (use cpu, cuda or cuda:N)")
    if device_problem(device):
        return refuse(f"--device {args.device}: {device_problem(device)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    set_fp32_math(args.tf32, fixed_shapes=True)
    features = cpu_features()
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}")
    print(f"CPU: {features.model}: {features.describe()}")
    variants = default_variants(device, args.compile)  # the auto variant measures its choice first

    report = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else features.model,
        "cpu_features": {**asdict(features), "native_bf16": features.native_bf16},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        # on a GPU, what "fp32" means here: exact float32, or TF32 convolutions and matmuls (--tf32)
        "fp32_math": fp32_math_mode() if device.type == "cuda" else "exact",
        "forward": [], "sampling": [], "training": [],
    }
    # Emulated bf16 (a CPU without AVX512-BF16/AMX) took ~11 minutes on the full-size peak operations;
    # the smaller ones give its (low) figure in seconds.
    emulated_bf16 = device.type == "cpu" and not features.native_bf16
    peaks = {v.precision: peak_tflops(device, v.precision, **(
                 {"seconds": 0.2, "small": True} if args.smoke
                 else {"small": True} if emulated_bf16 and v.precision == "bf16" else {}))
             for v in variants}
    report["peak_tflops"] = peaks
    if emulated_bf16 and "bf16" in peaks and not args.smoke:
        report["peak_note"] = "bf16 is emulated on this CPU: its peak was measured on smaller operations"
        print(f"{report['peak_note']} (the full-size ones take minutes)")
    print("device peak (best of a large matmul and a 3x3 convolution): "
          + ", ".join(f"{p} {t:.3g} TFLOP/s" for p, t in peaks.items())
          + (f"; fp32 is {report['fp32_math']}" + (" (TF32)" if report["fp32_math"] == "tf32" else " float32")
             if device.type == "cuda" else ""))
    for config in configs:
        if "forward" not in skip:
            rows = as_dicts(bench_forward(config, variants, batch_sizes, device, args.warmup, args.iters,
                                                peaks=peaks))
            report["forward"] += rows
            print(f"\n== UNet forward, config {config} ==")
            print(format_table(rows, ["variant", "batch_size", "images_per_s", "s_per_forward",
                                         "speedup_vs_baseline", "gflop_per_image", "achieved_tflops",
                                         "utilisation"]))
            print(ceiling_note(rows, peaks))
        if "sampling" not in skip:
            rows = bench_sampling(config, variants, device, args.sample_batch, args.measure_sampling)
            report["sampling"] += rows
            print(f"\n== seconds per sampled image, config {config} ==")
            print(format_table(rows, ["variant", "sampler", "batch_size", "s_per_image", "how"]))
        if "training" not in skip:
            rows = bench_training(config, variants, device, args.train_batch, args.iters)
            report["training"] += rows
            print(f"\n== training, config {config} ==")
            print(format_table(rows, ["variant", "batch_size", "images_per_s"]))
    report["peak_memory_mb"] = peak_memory_mb(device)
    print(f"\npeak memory: {report['peak_memory_mb']:.0f} MiB ({'GPU allocations' if device.type == 'cuda' else 'process RSS'})")
    atomic_write_text(args.out, json.dumps(report, indent=2))
    print(f"results written to {args.out}")
    return 0
