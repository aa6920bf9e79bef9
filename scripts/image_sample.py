r"""Sample images from the representations of the first images of a folder: `rcdm sample`.

    python scripts/image_sample.py $MODEL_FLAGS_128 --batch_size 8 --num_images 2 \
        --timestep_respacing 100 --data_dir DATA --type_model barlow

Every flag: `python scripts/image_sample.py --help`. A thin wrapper over the command-line layer
(`guided_diffusion_rcdm.cli`), kept so that the original's command lines work as written.
"""

import sys

import _local_package  # noqa: F401  (a clone without `pip install -e .`: see that file)
from guided_diffusion_rcdm.cli.sample import main

if __name__ == "__main__":
    sys.exit(main("sample"))
