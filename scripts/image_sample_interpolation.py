r"""Sample along the interpolation between the representations of two images: `rcdm interpolate`.

    python scripts/image_sample_interpolation.py $MODEL_FLAGS_128 --batch_size 8 \
        --timestep_respacing 100 --type_model barlow \
        --first_image_path FIRST_IMAGE_PATH --second_image_path SECOND_IMAGE_PATH

Every flag: `python scripts/image_sample_interpolation.py --help`. A thin wrapper over the command-line layer
(`guided_diffusion_rcdm.cli`), kept so that the original's command lines work as written.
"""

import sys

import _local_package  # noqa: F401  (a clone without `pip install -e .`: see that file)
from guided_diffusion_rcdm.cli.sample import main

if __name__ == "__main__":
    sys.exit(main("interpolate"))
