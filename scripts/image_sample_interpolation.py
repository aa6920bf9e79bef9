"""Sample along the interpolation between the representations of two images.

    python scripts/image_sample_interpolation.py $MODEL_FLAGS_128 --batch_size 8 \
        --timestep_respacing 100 --type_model barlow \
        --first_image_path FIRST_IMAGE_PATH --second_image_path SECOND_IMAGE_PATH

--batch_size points go from the first image's representation (alpha 0) to the second's (alpha 1),
linearly and spherically (--interpolation), every sample drawn from the same noise so that only the
representation changes. Writes OUT_DIR/NAME.jpeg (one row per interpolation: first image, samples,
second image) and OUT_DIR/NAME.npz (samples, features, alphas). See docs/sampling.md.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python scripts/image_sample_interpolation.py` from anywhere
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion_rcdm import logger
from guided_diffusion_rcdm import sample_util as su
from guided_diffusion_rcdm.representation_ops import INTERPOLATIONS


def create_argparser():
    parser = su.create_argparser(__doc__, name="interpolation")
    parser.add_argument("--first_image_path", default=".", help="image at alpha 0")
    parser.add_argument("--second_image_path", default=".", help="image at alpha 1")
    parser.add_argument("--interpolation", default="both", choices=("both", *INTERPOLATIONS),
                        help="linear, spherical or both (one grid row each)")
    return parser


def main(args) -> None:
    su.check_counts(args, batch_size="--batch_size")
    if args.batch_size < 2:
        raise su.UsageError("--batch_size is the number of interpolation points: it must be at least 2")
    su.check_model_path(args.model_path)
    su.check_image_file(args.first_image_path, "--first_image_path")
    su.check_image_file(args.second_image_path, "--second_image_path")
    methods = INTERPOLATIONS if args.interpolation == "both" else (args.interpolation,)
    logger.configure(dir=args.out_dir, format_strs="stdout,log")

    from guided_diffusion_rcdm.RCDM import RCDM

    rcdm = RCDM(args)
    logger.log(su.describe(rcdm))
    first, first_view = su.load_image_views(args.first_image_path, rcdm, "--first_image_path")
    second, second_view = su.load_image_views(args.second_image_path, rcdm, "--second_image_path")
    su.seed_everything(args.seed)
    ends = rcdm.encode(su.stack([first_view, second_view]))
    logger.log(f"interpolating ({', '.join(methods)}) over {args.batch_size} points with shared noise")
    out = rcdm.interpolate(ends[0], ends[1], args.batch_size, methods=methods)
    samples = out["samples"][:, :, 0]  # one noise: M x P x 3 x S x S
    extra = su.distances_if_asked(args, rcdm, samples, out["features"])
    grid, npz = su.output_paths(args)
    su.save_grid([su.row(first, s, last=second) for s in samples], grid)
    su.save_npz(npz, samples=su.to_uint8(samples), features=out["features"], alphas=out["alphas"],
                methods=out["methods"], endpoint_features=ends, images=su.to_uint8(su.stack([first, second])),
                paths=[args.first_image_path, args.second_image_path], **extra, **su.run_metadata(args, rcdm))
    logger.log(f"wrote {grid} and {npz}")


if __name__ == "__main__":
    su.run_cli(main, create_argparser())
