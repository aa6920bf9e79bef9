"""Benchmark the UNet (`python scripts/benchmark.py --help`); the benchmark itself and its
description are in guided_diffusion_rcdm/apps/benchmark.py."""

import sys

import _local_package  # noqa: F401  (a clone without `pip install -e .`: see that file)
from guided_diffusion_rcdm.apps.benchmark import create_argparser, main, parse_args  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
