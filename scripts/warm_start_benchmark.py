"""Warm start vs scratch (`python scripts/warm_start_benchmark.py --help`); the benchmark and its
description are in guided_diffusion_rcdm/apps/warm_start.py."""

import sys

import _local_package  # noqa: F401  (a clone without `pip install -e .`: see that file)
from guided_diffusion_rcdm.apps.warm_start import create_argparser, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
