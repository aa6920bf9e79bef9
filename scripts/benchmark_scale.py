"""Scale benchmark of the feature cache and the data scan (`python scripts/benchmark_scale.py --help`);
the benchmark and its description are in guided_diffusion_rcdm/apps/scale_benchmark.py."""

import sys

import _local_package  # noqa: F401  (a clone without `pip install -e .`: see that file)
from guided_diffusion_rcdm.apps.scale_benchmark import main

if __name__ == "__main__":
    sys.exit(main())
