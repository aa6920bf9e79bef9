r"""Benchmark the UNet: forward throughput, time per sampled image, training speed, peak memory.

Every figure is compared with a baseline run in the same process (the original's fp32 eager
forward: einsum attention, contiguous tensors); variants are timed in turns. The device's peak per
precision is measured first, so each forward also gets its utilisation of that peak, and the
ceiling (every precision at 100% of its peak, as a multiple of the baseline) is printed.
Prints tables and writes JSON. See docs/speed.md for figures and what the flags mean.

    python scripts/benchmark.py                          # 128x128 and small configs, batch 1 and 8
    python scripts/benchmark.py --configs small --compile
    python scripts/benchmark.py --smoke                  # a tiny config, one iteration (the tests run this)
"""

import sys

import _local_package  # noqa: F401  (a clone without `pip install -e .`: see that file)
from guided_diffusion_rcdm.apps.benchmark import create_argparser, main, parse_args  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
