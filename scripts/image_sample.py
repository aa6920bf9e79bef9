"""Sample images from the representations of the first images of a folder.

    python scripts/image_sample.py $MODEL_FLAGS_128 --batch_size 8 --num_images 2 \
        --timestep_respacing 100 --data_dir DATA --type_model barlow

For each of the first --num_images images of --data_dir (sorted, recursively), --batch_size samples
are drawn from that image's representation. Writes OUT_DIR/NAME.jpeg (one row per image: the
conditioning image, then its samples) and OUT_DIR/NAME.npz (samples, features, images, paths).
Without --model_path the published checkpoint for --type_model/--use_head is downloaded; a
checkpoint that records its flags needs no model flags. See docs/sampling.md.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python scripts/image_sample.py` from anywhere
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion_rcdm import logger
from guided_diffusion_rcdm import sample_util as su


def create_argparser():
    return su.create_argparser(__doc__, name="samples")


def main(args) -> None:
    # Cheap checks first: no model is built when the inputs cannot work.
    su.check_counts(args, batch_size="--batch_size", num_images="--num_images")
    su.check_model_path(args.model_path)
    paths = su.list_folder_images(args.data_dir, "--data_dir")
    su.check_enough_images(paths, args.num_images, "--num_images", "--data_dir", args.data_dir)
    logger.configure(dir=args.out_dir, format_strs="stdout,log")

    from guided_diffusion_rcdm.RCDM import RCDM

    rcdm = RCDM(args)
    logger.log(su.describe(rcdm))
    images, views, used = su.load_folder_views(paths, args.num_images, rcdm, "--data_dir", args.data_dir)
    su.seed_everything(args.seed)
    feats = rcdm.encode(views)
    samples = []
    for i, feat in enumerate(feats):
        logger.log(f"sampling {args.batch_size} images from the representation of {used[i]}")
        samples.append(rcdm.sample(feat.unsqueeze(0).expand(args.batch_size, -1)))
    extra = su.distances_if_asked(args, rcdm, samples, feats)
    grid, npz = su.output_paths(args)
    su.save_grid([su.row(images[i], samples[i]) for i in range(len(used))], grid)
    su.save_npz(npz, samples=su.to_uint8(su.stack(samples)), features=feats, images=su.to_uint8(images),
                paths=used, **extra, **su.run_metadata(args, rcdm))
    logger.log(f"wrote {grid} and {npz}")


if __name__ == "__main__":
    su.run_cli(main, create_argparser())
