"""Edit a representation: zero, or take from another image, the dimensions its neighbourhood shares.

    python scripts/image_sample_manipulation.py $MODEL_FLAGS_128 --batch_size 8 \
        --timestep_respacing 100 --dist --type_model simclr --image_path IMAGE_PATH \
        --folder_nn_path NN_PATH --image_target_path TARGET_PATH

The --n_neighbors (20) nearest neighbours of --image_path's representation among the images of
--folder_nn_path (faiss when installed, exact torch search otherwise) give the dimensions that are
non-zero in more than --n_common of them. --batch_size samples are drawn from the original
representation, from it with those dimensions zeroed, and from it with those dimensions taken from
--image_target_path's representation, sample j of each row from the same noise. Writes
OUT_DIR/NAME.jpeg (rows: original, zeroed, transplanted; first column the image the row comes from)
and OUT_DIR/NAME.npz. See docs/sampling.md.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python scripts/image_sample_manipulation.py` from anywhere
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion_rcdm import logger
from guided_diffusion_rcdm import sample_util as su


def create_argparser():
    parser = su.create_argparser(__doc__, name="manipulation")
    parser.add_argument("--n_common", type=int, default=14,
                        help="a dimension is shared when non-zero in more than this many neighbours")
    parser.add_argument("--image_path", default=".", help="image whose representation is edited")
    parser.add_argument("--folder_nn_path", default=".", help="folder of images to find neighbours in")
    parser.add_argument("--image_target_path", default=".", help="image whose values are transplanted")
    parser.add_argument("--n_neighbors", type=int, default=20,
                        help="size of the neighbourhood (the original's 20)")
    parser.add_argument("--knn_backend", default="auto", choices=("auto", "faiss", "torch"),
                        help="neighbour search: faiss if installed (auto), or exact torch")
    return parser


def main(args) -> None:
    # Everything that can be checked without a model is checked first.
    su.check_counts(args, batch_size="--batch_size", n_neighbors="--n_neighbors")
    if not 0 <= args.n_common < args.n_neighbors:
        raise su.UsageError(
            f"--n_common {args.n_common}: a dimension is kept when non-zero in more than --n_common of "
            f"the --n_neighbors {args.n_neighbors} neighbours, so it must be between 0 and "
            f"{args.n_neighbors - 1}"
        )
    su.check_model_path(args.model_path)
    su.check_image_file(args.image_path, "--image_path")
    su.check_image_file(args.image_target_path, "--image_target_path")
    folder = su.list_folder_images(args.folder_nn_path, "--folder_nn_path")
    su.check_enough_images(folder, args.n_neighbors, "--n_neighbors", "--folder_nn_path", args.folder_nn_path)
    if args.knn_backend == "faiss":
        su.require_faiss("--knn_backend faiss")
    logger.configure(dir=args.out_dir, format_strs="stdout,log")

    from guided_diffusion_rcdm.RCDM import RCDM

    rcdm = RCDM(args)
    logger.log(su.describe(rcdm))
    source, source_view = su.load_image_views(args.image_path, rcdm, "--image_path")
    target, target_view = su.load_image_views(args.image_target_path, rcdm, "--image_target_path")
    feats = rcdm.encode(su.stack([source_view, target_view]))
    logger.log(f"encoding the {len(folder)} images of {args.folder_nn_path}")
    hood_feats, hood_paths, skipped = rcdm.encode_files(folder)
    if skipped:
        logger.warn(f"{len(skipped)} unreadable image(s) in --folder_nn_path were skipped")
    su.seed_everything(args.seed)
    out = rcdm.manipulate(feats[0], feats[1], hood_feats, n_neighbors=args.n_neighbors,
                          n_common=args.n_common, num_samples=args.batch_size, backend=args.knn_backend)
    logger.log(f"{len(out['dims'])} of {rcdm.ssl_dim} dimensions are non-zero in more than "
               f"{args.n_common} of the {args.n_neighbors} neighbours")
    if len(out["dims"]) == 0:
        logger.warn("no dimension is shared by the neighbourhood: the three rows differ only by "
                    "chance; lower --n_common")
    extra = su.distances_if_asked(args, rcdm, out["samples"], out["features"])
    grid, npz = su.output_paths(args)
    firsts = (source, source, target)
    su.save_grid([su.row(img, s) for img, s in zip(firsts, out["samples"])], grid)
    su.save_npz(
        npz, samples=su.to_uint8(out["samples"]), features=out["features"], dims=out["dims"],
        counts=out["counts"], source_feature=feats[0], target_feature=feats[1],
        neighbors=[hood_paths[i] for i in out["neighbors"].tolist()], neighbor_distances=out["distances"],
        images=su.to_uint8(su.stack([source, target])), paths=[args.image_path, args.image_target_path],
        rows=["original", "zeroed", "transplanted"], **extra, **su.run_metadata(args, rcdm),
    )
    logger.log(f"wrote {grid} and {npz}")


if __name__ == "__main__":
    su.run_cli(main, create_argparser())
