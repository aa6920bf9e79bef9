"""The sampling commands: `rcdm sample` (scripts/image_sample.py), `rcdm interpolate`
(scripts/image_sample_interpolation.py) and `rcdm manipulate` (scripts/image_sample_manipulation.py).

Each checks its inputs and builds the model before it creates or writes anything in --out_dir, so
a mistake (one line, exit status 2) leaves the folder as it was. See docs/sampling.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .. import logger
from ..RCDM import RCDM
from ..representation_ops import INTERPOLATIONS
from . import sampling as su
from .flags import add_flags
from .policy import run_command

SAMPLE_DOC = r"""Sample images from the representations of the first images of a folder.

    python scripts/image_sample.py $MODEL_FLAGS_128 --batch_size 8 --num_images 2 \
        --timestep_respacing 100 --data_dir DATA --type_model barlow

For each of the first --num_images images of --data_dir (sorted, recursively), --batch_size samples
are drawn from that image's representation. Writes OUT_DIR/NAME.jpeg (one row per image: the
conditioning image, then its samples) and OUT_DIR/NAME.npz (samples, features, images, paths).
Without --model_path the published checkpoint for --type_model/--use_head is downloaded; a
checkpoint that records its flags needs no model flags. See docs/sampling.md.
"""


def sample_argparser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = su.create_argparser(SAMPLE_DOC, name="samples", prog=prog)
    return parser


def sample(args: argparse.Namespace) -> None:
    # Cheap checks first: no model is built when the inputs cannot work.
    su.check_counts(args, batch_size="--batch_size", num_images="--num_images")
    su.check_model_path(args.model_path)
    paths = su.list_folder_images(args.data_dir, "--data_dir")
    su.check_enough_images(paths, args.num_images, "--num_images", "--data_dir", args.data_dir)
    su.check_out_dir(args.out_dir)
    rcdm = RCDM(args)  # a checkpoint or an encoder that does not fit fails here, before any write
    images, views, used = su.load_folder_views(paths, args.num_images, rcdm, "--data_dir", args.data_dir)
    with su.writing_outputs(args):  # whole, or nothing left (a full disk, Ctrl-C)
        logger.log(su.describe(rcdm))
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
                    paths=used, **extra, **su.run_metadata(rcdm, args.seed))
        logger.log(f"wrote {grid} and {npz}")


INTERPOLATE_DOC = r"""Sample along the interpolation between the representations of two images.

    python scripts/image_sample_interpolation.py $MODEL_FLAGS_128 --batch_size 8 \
        --timestep_respacing 100 --type_model barlow \
        --first_image_path FIRST_IMAGE_PATH --second_image_path SECOND_IMAGE_PATH

--batch_size points go from the first image's representation (alpha 0) to the second's (alpha 1),
linearly and spherically (--interpolation), every sample drawn from the same noise so that only the
representation changes. Writes OUT_DIR/NAME.jpeg (one row per interpolation: first image, samples,
second image) and OUT_DIR/NAME.npz (samples, features, alphas). See docs/sampling.md.
"""


def interpolate_argparser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = su.create_argparser(INTERPOLATE_DOC, name="interpolation", prog=prog)
    add_flags(parser.add_argument_group("inputs"), 'first_image_path', 'second_image_path', 'interpolation')
    return parser


def interpolate(args: argparse.Namespace) -> None:
    su.check_counts(args, batch_size="--batch_size")
    if args.batch_size < 2:
        raise su.UsageError("--batch_size is the number of interpolation points: it must be at least 2")
    su.check_model_path(args.model_path)
    su.check_image_file(args.first_image_path, "--first_image_path")
    su.check_image_file(args.second_image_path, "--second_image_path")
    methods = INTERPOLATIONS if args.interpolation == "both" else (args.interpolation,)
    su.check_out_dir(args.out_dir)
    rcdm = RCDM(args)  # a checkpoint or an encoder that does not fit fails here, before any write
    first, first_view = su.load_image_views(args.first_image_path, rcdm, "--first_image_path")
    second, second_view = su.load_image_views(args.second_image_path, rcdm, "--second_image_path")
    with su.writing_outputs(args):  # whole, or nothing left (a full disk, Ctrl-C)
        logger.log(su.describe(rcdm))
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
                    paths=[args.first_image_path, args.second_image_path], **extra, **su.run_metadata(rcdm, args.seed))
        logger.log(f"wrote {grid} and {npz}")


MANIPULATE_DOC = r"""Edit a representation: zero, or take from another image, the dimensions its neighbourhood shares.

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


def manipulate_argparser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = su.create_argparser(MANIPULATE_DOC, name="manipulation", prog=prog)
    add_flags(parser.add_argument_group("inputs"), 'image_path', 'folder_nn_path', 'image_target_path', 'n_common', 'n_neighbors', 'knn_backend')
    return parser


def manipulate(args: argparse.Namespace) -> None:
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
    su.check_out_dir(args.out_dir)
    rcdm = RCDM(args)  # a checkpoint or an encoder that does not fit fails here, before any write
    source, source_view = su.load_image_views(args.image_path, rcdm, "--image_path")
    target, target_view = su.load_image_views(args.image_target_path, rcdm, "--image_target_path")
    with su.writing_outputs(args):  # whole, or nothing left (a full disk, Ctrl-C)
        logger.log(su.describe(rcdm))
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
            rows=["original", "zeroed", "transplanted"], **extra, **su.run_metadata(rcdm, args.seed),
        )
        logger.log(f"wrote {grid} and {npz}")


COMMANDS = {"sample": (sample_argparser, sample), "interpolate": (interpolate_argparser, interpolate),
            "manipulate": (manipulate_argparser, manipulate)}


def main(command: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the sampling command `command` (sample, interpolate or manipulate) on `argv`; the exit status."""
    make_parser, run = COMMANDS[command]
    return run_command(run, make_parser(prog), argv)
