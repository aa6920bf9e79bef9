r"""Edit a representation with its neighbourhood's shared dimensions: `rcdm manipulate`.

    python scripts/image_sample_manipulation.py $MODEL_FLAGS_128 --batch_size 8 \
        --timestep_respacing 100 --dist --type_model simclr --image_path IMAGE_PATH \
        --folder_nn_path NN_PATH --image_target_path TARGET_PATH

Every flag: `python scripts/image_sample_manipulation.py --help`. A thin wrapper over the command-line layer
(`guided_diffusion_rcdm.cli`), kept so that the original's command lines work as written.
"""

import sys

import _local_package  # noqa: F401  (a clone without `pip install -e .`: see that file)
from guided_diffusion_rcdm.cli.sample import main

if __name__ == "__main__":
    sys.exit(main("manipulate"))
