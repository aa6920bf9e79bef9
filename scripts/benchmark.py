"""Benchmark the UNet: forward throughput, time per sampled image, training speed, peak memory.

Every figure is compared with a baseline run in the same process (the original's fp32 eager
forward: einsum attention, contiguous tensors); variants are timed in turns. The device's peak per
precision is measured first, so each forward also gets its utilisation of that peak, and the
ceiling (every precision at 100% of its peak, as a multiple of the baseline) is printed.
Prints tables and writes JSON. See docs/speed.md for figures and what the flags mean.

    python scripts/benchmark.py                          # 128x128 and small configs, batch 1 and 8
    python scripts/benchmark.py --configs small --compile
    python scripts/benchmark.py --smoke                  # a tiny config, one iteration (the tests run this)
"""

import argparse
import json
import sys
from dataclasses import asdict

import torch

from guided_diffusion_rcdm.apps import benchmark as bm
from guided_diffusion_rcdm.fileio import atomic_write_text
from guided_diffusion_rcdm.precision import (
    add_tf32_arg,
    cpu_features,
    default_device,
    device_problem,
    fp32_math_mode,
    set_fp32_math,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="128,small", help="comma-separated: " + ", ".join(bm.CONFIGS))
    parser.add_argument("--batch_sizes", default="1,8", help="forward batch sizes")
    parser.add_argument("--sample_batch", type=int, default=8, help="batch size for the sampling figures")
    parser.add_argument("--train_batch", type=int, default=8, help="batch size for the training figures")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per figure (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile variants")
    parser.add_argument("--measure_sampling", action="store_true",
                        help="run the samplers for real (default: model calls x measured forward time)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: forward, sampling, training")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default="benchmark.json", help="where to write the JSON results")
    parser.add_argument("--smoke", action="store_true", help="tiny config, one iteration: checks the script runs")
    add_tf32_arg(parser)
    return parser.parse_args(argv)


def ceiling_note(rows: list[dict], peaks: dict[str, float]) -> str:
    """What the hardware allows: each precision at 100% of its peak, as a multiple of the baseline."""
    lines = []
    for row in rows:
        if row["variant"] == bm.BASELINE.name:
            ceilings = ", ".join(f"{p} {peaks[p] / row['achieved_tflops']:.2f}x" for p in peaks if peaks[p] == peaks[p])
            lines.append(f"batch {row['batch_size']}: the baseline runs at {row['utilisation']:.0%} of the fp32 "
                         f"peak; a forward at 100% of the peak would be {ceilings} the baseline")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.configs, args.batch_sizes, args.iters, args.warmup = "tiny", "2", 1, 0
        args.sample_batch, args.train_batch, args.measure_sampling = 2, 2, False
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device) if args.device else default_device()
    except RuntimeError:
        print(f"--device {args.device!r} is not a device name (use cpu, cuda or cuda:N)", file=sys.stderr)
        return 2
    if device_problem(device):
        print(f"--device {args.device}: {device_problem(device)}", file=sys.stderr)
        return 2
    set_fp32_math(args.tf32, fixed_shapes=True)
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in bm.CONFIGS]
    if unknown:
        print(f"unknown --configs {unknown}: choose from {', '.join(bm.CONFIGS)}", file=sys.stderr)
        return 2
    skip = set(args.skip.split(",")) - {""}
    features = cpu_features()
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}")
    print(f"CPU: {features.model}: {features.describe()}")
    variants = bm.default_variants(device, args.compile)  # the auto variant measures its choice first
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

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
    # Emulated bf16 (a CPU without AVX512-BF16/AMX) takes ~10 minutes on the full-size peak operations;
    # small ones give its (low) figure in seconds.
    emulated_bf16 = device.type == "cpu" and not features.native_bf16
    peaks = {v.precision: bm.peak_tflops(device, v.precision, **(
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
            rows = bm.as_dicts(bm.bench_forward(config, variants, batch_sizes, device, args.warmup, args.iters,
                                                peaks=peaks))
            report["forward"] += rows
            print(f"\n== UNet forward, config {config} ==")
            print(bm.format_table(rows, ["variant", "batch_size", "images_per_s", "s_per_forward",
                                         "speedup_vs_baseline", "gflop_per_image", "achieved_tflops",
                                         "utilisation"]))
            print(ceiling_note(rows, peaks))
        if "sampling" not in skip:
            rows = bm.bench_sampling(config, variants, device, args.sample_batch, args.measure_sampling)
            report["sampling"] += rows
            print(f"\n== seconds per sampled image, config {config} ==")
            print(bm.format_table(rows, ["variant", "sampler", "batch_size", "s_per_image", "how"]))
        if "training" not in skip:
            rows = bm.bench_training(config, variants, device, args.train_batch, args.iters)
            report["training"] += rows
            print(f"\n== training, config {config} ==")
            print(bm.format_table(rows, ["variant", "batch_size", "images_per_s"]))
    report["peak_memory_mb"] = bm.peak_memory_mb(device)
    print(f"\npeak memory: {report['peak_memory_mb']:.0f} MiB ({'GPU allocations' if device.type == 'cuda' else 'process RSS'})")
    atomic_write_text(args.out, json.dumps(report, indent=2))
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
