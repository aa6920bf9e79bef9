r"""Run the whole RCDM loop offline on a CPU in a few minutes and write a browsable report: `rcdm quickstart`.

    python scripts/quickstart.py                      # ~5 minutes of training, report in quickstart_out/
    python scripts/quickstart.py --minutes 10 --out_dir runs/qs --image_size 64

Real photographs from scikit-image, a frozen ResNet-50 (published weights if on disk, else an
untrained one, said plainly), a small RCDM trained for --minutes, then samples, an interpolation, a
manipulation and representation-fidelity scores in OUT_DIR/index.html. Running it again with the
same settings reuses the trained model. See docs/quickstart.md.
"""

import sys

import _local_package  # noqa: F401  (a clone without `pip install -e .`: see that file)
from guided_diffusion_rcdm.apps.quickstart import main

if __name__ == "__main__":
    sys.exit(main())
