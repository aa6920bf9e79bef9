"""Warm start vs scratch, measured on this machine: does `--init_from` cut the steps an RCDM needs?

`python scripts/warm_start_benchmark.py` (offline, CPU, a few minutes) does what a user with a new
encoder would do, in miniature:

1. the *foundation*: a small diffusion UNet pre-trained for `--pretrain_steps` on crops of the
   quickstart's photographs (scikit-image's), written as a checkpoint file. `--foundation uncond`
   (the default) is unconditional, like `openai_256_uncond`; `--foundation class` is
   class-conditional, like `openai_64/128/256/512`: each crop's class is the photograph it was cut from
   (guided-diffusion's 1000-class embedding, one class per photograph used; `--photos_per_class 2`:
   one class per two photographs, so a class no longer tells which photograph), so the foundation's
   embedding path already carries what the image shows, as ImageNet's labels do for the public
   models;
2. two RCDM runs of `--train_steps` steps each, on the same batches, timesteps and noise, conditioned on
   a frozen encoder's representation (`--type_model`, random fixed-seed weights unless
   `--pretrained_encoder`): one from scratch, one with `TrainLoop(init_from=<that file>)`; optionally
   more warm starts: the representation's path trained first (`--cond_first_steps`), or the copied
   weights at a lower learning rate than the new `ssl_emb` (`--warm_lr_scales`, `--warm_new_lr_mult`:
   `TrainLoop(init_lr_scale=...)`), or `ssl_emb` fitted to the class embeddings of the training
   crops' classes (`--fit`: `--init_fit_images`, `foundations.with_fitted_ssl_emb`);
3. every `--eval_every` steps, each run's training loss over the last steps and its
   representation fidelity: samples (DDIM, `--steps`) from the representations of the
   held-out views (the photographs' centre squares, two never trained on), encoded again and
   ranked against all conditioning representations (MRR), next to the shuffled-conditioning
   control (`metrics.representation_fidelity`); also the MRR smoothed over the last two
   evaluations, since a single evaluation swings with the weights of that step.

It prints a table and writes the curves as JSON (`--out_json`), with the step at which each warm
start reached the scratch run's final MRR (and final smoothed MRR), if it did. Figures are
measurements, not tests.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import foundations, hub, logger, metrics
from ..cli.flags import Flag, Parser, add_flags
from ..cli.policy import run_main
from ..encoders import EncoderSpec, encode_images
from ..errors import UsageError
from ..image_datasets import model_input
from ..config import ModelConfig
from ..script_util import create_model_and_diffusion
from ..train_util import TrainLoop
from .quickstart import crop_view, view_boxes

BENCH_FLAGS = (
    Flag("pretrain_steps", 200, int, "steps of the foundation's pre-training"),
    Flag("foundation", "uncond", help="the foundation's conditioning: 'uncond' (like openai_256_uncond) or 'class', "
         "one class per photograph (like the class-conditional openai_64/128/256/512)", choices=("uncond", "class")),
    Flag("photos_per_class", 1, int, "with --foundation class: photographs per class (2: classes coarser than the "
         "photographs, as an ImageNet class is coarser than what a representation tells apart)"),
    Flag("fit", False, bool, "with --foundation class: also run a warm start whose `ssl_emb` starts fitted to the class "
         "embeddings of the training crops' classes (--init_fit_images), and with --cond_first_steps one that "
         "then trains the representation's path first"),
    Flag("train_steps", 240, int, "RCDM training steps of each run (scratch and warm start)"),
    Flag("eval_every", 40, int, "steps between fidelity evaluations"),
    Flag("crops_per_photo", 12, int, "training crops cut from each photograph"),
    Flag("samples_per_image", 2, int, "samples drawn from each held-out view at each evaluation"),
    Flag("cond_first_steps", 0, int, "also run a warm start that trains only the representation's path for "
         "this many steps (--train_only cond), then everything (0: no such run)"),
    Flag("warm_lr_scales", "", help="comma-separated factors: for each, also run a warm start whose copied weights "
         "train at --lr times it, the new `ssl_emb` at --lr (TrainLoop(init_lr_scale=...)); default: no such run"),
    Flag("warm_new_lr_mult", 1.0, float, "in the --warm_lr_scales runs, the new `ssl_emb` trains at --lr times this "
         "(the copied weights still at --lr times the scale)"),
    Flag("out_json", "", help="where to write the curves (JSON); default: none"),
)


def create_argparser(prog: str | None = None) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__)
    add_flags(p, "image_size", "num_channels", "batch_size", "lr", "seed", "type_model", "pretrained_encoder",
              "encoder_input_size", "steps",
              helps={"steps": "DDIM steps of each evaluation's samples"},
              defaults={"steps": 10, "image_size": 32, "num_channels": 32, "batch_size": 8, "lr": 1e-3, "type_model": "resnet18",
                        "pretrained_encoder": False, "encoder_input_size": 112})
    for flag in BENCH_FLAGS:
        flag.add_to(p)
    return p


def model_flags(image_size: int, num_channels: int) -> dict:
    """The small UNet: the quickstart's architecture (one residual block per level)."""
    if image_size not in (32, 64):
        raise UsageError(f"--image_size {image_size}: the benchmark runs at 32 or 64")
    return ModelConfig.preset("quickstart", image_size=image_size, num_channels=num_channels,
                              predict_xstart=True).flags()


def views(crops_per_photo: int, seed: int) -> tuple[list[Image.Image], list[int], list[Image.Image]]:
    """Training crops (random squares of every photo but the unseen ones), each crop's class (the
    index of its photo) and held-out views (every photo's centre square), as PIL images."""
    train, labels, held = [], [], []
    for label, (_, image, boxes, centre) in enumerate(view_boxes(crops_per_photo, seed)):
        train.extend(crop_view(image, box) for box in boxes)
        labels.extend([label] * len(boxes))
        held.append(crop_view(image, centre))
    return train, labels, held


def _loop(model, diffusion, args, out_dir: Path, init_from=None, cond_first: int = 0,
          lr_scale: float = 1.0, new_lr_mult: float = 1.0) -> TrainLoop:
    """A TrainLoop with the new tensors at `--lr x new_lr_mult`, the copied ones at `--lr x lr_scale`."""
    return TrainLoop(model=model, diffusion=diffusion, data=None, batch_size=args.batch_size, microbatch=-1,
                     lr=args.lr * new_lr_mult, ema_rate="0.99", log_interval=10**9, save_interval=10**9,
                     resume_checkpoint="", progress=False, out_dir=str(out_dir), precision="fp32", seed=args.seed,
                     init_from=init_from, train_only="cond" if cond_first else "", train_only_steps=cond_first,
                     init_lr_scale=lr_scale / new_lr_mult)


def _step(loop: TrainLoop, images: torch.Tensor, cond: dict[str, torch.Tensor], order: np.ndarray, step: int,
          seed: int) -> float:
    """One step on the batch `order[step]`; `cond`: the model's conditioning for every image
    (`{}`, `{"y": classes}` or `{"feat": features}`)."""
    idx = torch.from_numpy(order[step])
    # The same noise (torch) and timesteps (the schedule sampler draws with numpy) in every run.
    torch.manual_seed(seed * 1_000_003 + step)
    np.random.seed((seed * 1_000_003 + step) % 2**32)
    return float(loop.run_step(images[idx], {k: v[idx] for k, v in cond.items()}))


@torch.no_grad()
def fidelity(model, sampler, encoder, held_feats: torch.Tensor, args) -> dict:
    """MRR of samples drawn from the held-out views' representations, and the shuffled control."""
    n, k = held_feats.shape[0], args.samples_per_image
    cond = held_feats.repeat_interleave(k, 0)
    g = torch.Generator().manual_seed(args.seed + 7)
    noise = torch.randn(n * k, 3, args.image_size, args.image_size, generator=g)
    model.eval()
    samples = sampler.ddim_sample_loop(model, noise.shape, noise=noise, model_kwargs={"feat": cond})
    model.train()
    feats = encode_images(encoder, samples.clamp(-1, 1), input_size=args.encoder_input_size).features
    result = metrics.representation_fidelity(feats.reshape(n, k, -1), held_feats, num_shuffles=20, seed=args.seed)
    return {"mrr": result.model.mrr, "shuffled_mrr": result.shuffled.mrr, "chance_mrr": result.chance["mrr"]}


def run(args: argparse.Namespace) -> dict:
    if args.train_steps < 1 or args.eval_every < 1 or args.pretrain_steps < 0 or args.photos_per_class < 1:
        raise UsageError("--train_steps, --eval_every and --photos_per_class must be positive, --pretrain_steps at "
                         "least 0")
    if args.fit and args.foundation != "class":
        raise UsageError("--fit needs --foundation class: the fit maps representations to class embeddings")
    try:
        scales = [float(x) for x in args.warm_lr_scales.split(",") if x.strip()]
    except ValueError:
        scales = [-1.0]
    if any(not 0 <= x < float("inf") for x in scales) or not 0 < args.warm_new_lr_mult < float("inf"):
        raise UsageError(f"--warm_lr_scales {args.warm_lr_scales!r} / --warm_new_lr_mult {args.warm_new_lr_mult}: "
                         "give comma-separated numbers >= 0 (e.g. 0.1,0.01) and a multiple > 0")
    torch.manual_seed(args.seed)
    flags = model_flags(args.image_size, args.num_channels)
    t0 = time.time()
    spec = EncoderSpec(args.type_model, pretrained=args.pretrained_encoder, input_size=args.encoder_input_size)
    encoder = spec.build("cpu")
    train_views, photos, held_views = views(args.crops_per_photo, args.seed)
    labels = [p // args.photos_per_class for p in photos]
    images = torch.stack([model_input(v, args.image_size) for v in train_views])
    feats = encode_images(encoder, train_views, input_size=args.encoder_input_size).features
    held_feats = encode_images(encoder, held_views, input_size=args.encoder_input_size).features
    ssl_dim = feats.shape[1]
    print(f"{len(train_views)} training crops, {len(held_views)} held-out views, encoder {spec.name} "
          f"({'published' if args.pretrained_encoder else 'random fixed-seed'} weights, width {ssl_dim}); "
          f"prepared in {time.time() - t0:.0f} s", flush=True)
    _, sampler = create_model_and_diffusion(**{**flags, "timestep_respacing": f"ddim{args.steps}"})
    rng = np.random.default_rng(args.seed)
    total = max(args.pretrain_steps, args.train_steps)
    order = np.stack([rng.choice(len(images), args.batch_size, replace=False) for _ in range(total)])

    out: dict = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)",
                 "flags": flags, "args": {k: v for k, v in vars(args).items() if k != "explicit"},
                 "num_train": len(train_views), "num_heldout": len(held_views), "ssl_dim": ssl_dim}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        logger.configure(dir=str(tmp_path / "log"), format_strs=["log"])
        # 1. the foundation, on the same photographs: unconditional or one class per photograph
        t0 = time.time()
        class_cond = args.foundation == "class"
        base_flags = {**flags, "class_cond": class_cond}
        model, diffusion = create_model_and_diffusion(**base_flags)
        loop = _loop(model, diffusion, args, tmp_path / "foundation")
        base_cond = {"y": torch.tensor(labels)} if class_cond else {}
        losses = [_step(loop, images, base_cond, order, s, args.seed + 1) for s in range(args.pretrain_steps)]
        foundation = tmp_path / "foundation.pt"
        hub.save_checkpoint(foundation, model.state_dict(), meta={"model_flags": base_flags})
        out["pretrain"] = {"steps": args.pretrain_steps, "conditioning": args.foundation,
                           "seconds": time.time() - t0, "final_loss": float(np.mean(losses[-20:])) if losses else None}
        kind = "class-conditional" if class_cond else "unconditional"
        print(f"foundation ({kind}): {args.pretrain_steps} steps in {out['pretrain']['seconds']:.0f} s, loss "
              f"{out['pretrain']['final_loss'] or float('nan'):.4f}", flush=True)

        # 2. the RCDM from scratch and from the foundation: same batches, timesteps and noise
        runs = [("scratch", None, 0, 1.0), ("warm", str(foundation), 0, 1.0)]
        if args.cond_first_steps:
            runs.append(("warm_cond_first", str(foundation), args.cond_first_steps, 1.0))
        mult = args.warm_new_lr_mult
        runs = [(*r, 1.0) for r in runs] + [
            (f"warm_lr_x{x:g}" if mult == 1 else f"warm_new_x{mult:g}_copied_x{x:g}", str(foundation), 0, x, mult)
            for x in scales]
        if args.fit:  # the ssl_emb of --init_fit_images: fitted to the training crops' classes
            fitted = foundations.with_fitted_ssl_emb(foundations.load_foundation(str(foundation)), feats,
                                                     torch.tensor(labels))
            runs.append(("warm_fit", fitted, 0, 1.0, 1.0))
            if args.cond_first_steps:
                runs.append(("warm_fit_cond_first", fitted, args.cond_first_steps, 1.0, 1.0))
        for name, init, cond_first, lr_scale, new_lr_mult in runs:
            torch.manual_seed(args.seed + 2)
            model, diffusion = create_model_and_diffusion(**{**flags, "feat_cond": True, "ssl_dim": ssl_dim})
            loop = _loop(model, diffusion, args, tmp_path / name, init_from=init, cond_first=cond_first,
                         lr_scale=lr_scale, new_lr_mult=new_lr_mult)
            curve = [{"step": 0, "loss": None, **fidelity(model, sampler, encoder, held_feats, args)}]
            window, t0, train_seconds = [], time.time(), 0.0
            for s in range(args.train_steps):
                t1 = time.time()
                window.append(_step(loop, images, {"feat": feats}, order, s, args.seed + 2))
                train_seconds += time.time() - t1
                if (s + 1) % args.eval_every == 0 or s + 1 == args.train_steps:
                    curve.append({"step": s + 1, "loss": float(np.mean(window)),
                                  **fidelity(model, sampler, encoder, held_feats, args)})
                    curve[-1]["mrr_smoothed"] = (curve[-2]["mrr"] + curve[-1]["mrr"]) / 2
                    window = []
                    print(f"  {name} step {s + 1:4d}  loss {curve[-1]['loss']:.4f}  MRR {curve[-1]['mrr']:.3f} "
                          f"(smoothed {curve[-1]['mrr_smoothed']:.3f}, shuffled {curve[-1]['shuffled_mrr']:.3f})",
                          flush=True)
            out[name] = {"curve": curve, "train_seconds": train_seconds, "seconds": time.time() - t0}
            out["runs"] = [*out.get("runs", []), name]
    logger.reset()
    # The target, judged the same way for every run: the first evaluation at which a warm start's
    # MRR reaches the scratch run's final one; also on the MRR smoothed over the last two
    # evaluations (less noisy), against the scratch run's final smoothed MRR.
    for key in ("mrr", "mrr_smoothed"):
        target = out["scratch"]["curve"][-1][key]
        out[f"scratch_final_{key}"] = target
        for name in out["runs"][1:]:
            reached = next((p["step"] for p in out[name]["curve"] if p["step"] > 0 and p[key] >= target), None)
            out[f"{name}_steps_to_scratch_final_{key}"] = reached
            out[name][f"target_reached_{key}"] = reached is not None and reached <= args.train_steps / 3
    out["target_reached_by"] = [n for n in out["runs"][1:] if out[n]["target_reached_mrr"]]
    return out


def table(r: dict) -> str:
    names = r["runs"]
    rows = [("step", *(f"loss {n}" for n in names), *(f"MRR {n}" for n in names),
             *(f"smoothed {n}" for n in names), "shuffled MRR")]
    for points in zip(*(r[n]["curve"] for n in names)):
        rows.append((str(points[0]["step"]), *("-" if p["loss"] is None else f"{p['loss']:.4f}" for p in points),
                     *(f"{p['mrr']:.3f}" for p in points),
                     *(f"{p['mrr_smoothed']:.3f}" if "mrr_smoothed" in p else "-" for p in points),
                     "/".join(f"{p['shuffled_mrr']:.3f}" for p in points)))
    width = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(row, width)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in width) + "|")
    third = r["args"]["train_steps"] // 3
    lines.append(f"scratch final MRR {r['scratch_final_mrr']:.3f}, smoothed {r['scratch_final_mrr_smoothed']:.3f} "
                 f"(chance {r['scratch']['curve'][-1]['chance_mrr']:.3f}); target: reached within {third} steps; "
                 f"foundation ({r['pretrain'].get('conditioning', 'uncond')}) {r['pretrain']['steps']} steps, "
                 f"{r['pretrain']['seconds']:.0f} s; training time scratch {r['scratch']['train_seconds']:.0f} s")
    for name in names[1:]:
        got = [r[f"{name}_steps_to_scratch_final_{k}"] for k in ("mrr", "mrr_smoothed")]
        done = [r[name][f"target_reached_{k}"] for k in ("mrr", "mrr_smoothed")]
        lines.append(f"{name}: reaches it at step {got[0] if got[0] is not None else 'never'} "
                     f"({'reached' if done[0] else 'not reached'}), smoothed at step "
                     f"{got[1] if got[1] is not None else 'never'} ({'reached' if done[1] else 'not reached'}); "
                     f"training time {r[name]['train_seconds']:.0f} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = create_argparser(prog)
    args = parser.parse_args(argv)

    def go() -> None:
        r = run(args)
        print(table(r))
        if args.out_json:
            Path(args.out_json).write_text(json.dumps(r, indent=1))
            print(f"curves written to {args.out_json}")

    return run_main(go, prog or "warm_start_benchmark", parser)
