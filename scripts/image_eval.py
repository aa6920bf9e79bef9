r"""Score a sample file: representation fidelity, FID and IS: `rcdm eval`.

    python scripts/image_eval.py OUT_DIR/samples.npz --ref REFERENCE_FOLDER_OR_NPZ

Every flag: `python scripts/image_eval.py --help`. A thin wrapper over the command-line layer
(`guided_diffusion_rcdm.cli`), kept so that the original's command lines work as written.
"""

import sys

import _local_package  # noqa: F401  (a clone without `pip install -e .`: see that file)
from guided_diffusion_rcdm.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
