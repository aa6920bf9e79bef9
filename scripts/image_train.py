r"""Train a representation-conditioned diffusion model (RCDM) on a folder of images: `rcdm train`.

    python scripts/image_train.py $MODEL_FLAGS_128 $TRAIN_FLAGS --feat_cond --data_dir DATA \
        --type_model dino --out_dir RUN

Every flag: `python scripts/image_train.py --help`. A thin wrapper over the command-line layer
(`guided_diffusion_rcdm.cli`), kept so that the original's command lines work as written.
"""

import sys

import _local_package  # noqa: F401  (a clone without `pip install -e .`: see that file)
from guided_diffusion_rcdm.cli.train import create_argparser, main, train  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
