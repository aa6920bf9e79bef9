"""`rcdm cache`: encode a folder of images once, for training with `--feat_cache`.

    rcdm cache --data_dir DATASET_DIR --type_model dino --feat_cache DIR

The cache records the encoder (`encoders.EncoderSpec`), its precision and the storage dtype;
training with `--feat_cache DIR` and the same encoder reads the representations from it. Any
launcher works (torchrun, srun, mpiexec): rank 0 lists the data folder, each process encodes a
contiguous share and writes it as its own shard; running it again after adding images encodes
only the new ones, into new shards.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .. import dist_util, logger
from ..errors import UsageError
from ..encoders import EncoderSpec
from ..feature_cache import prepare_feature_cache
from ..fileio import check_out_dir
from ..image_datasets import scan_images
from .flags import ENCODER_FLAGS, Parser, add_flags
from .policy import run_command


def create_argparser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=__doc__)
    add_flags(parser, "data_dir", "feat_cache", "feat_cache_dtype", *ENCODER_FLAGS, "batch_size", "num_workers",
              "encoder_precision", "progress", defaults={"batch_size": 64, "num_workers": 2},
              helps={"feat_cache": "folder for the cache (required)",
                     "encoder_precision": "the encoder's compute precision (recorded in the cache): fp32 "
                                          "(exact), auto (bf16 only where this machine runs it natively and "
                                          "faster), bf16 or fp16"})
    return parser


def cache(args: argparse.Namespace) -> None:
    if not args.feat_cache:
        raise UsageError("--feat_cache is required: the folder to write the cached representations in")
    check_out_dir(args.feat_cache, "--feat_cache")  # a folder; not a file, nor under one
    EncoderSpec.from_flags(args)  # flags that cannot name an encoder: before the folder is made
    dist_util.setup_dist()
    listing = scan_images(args.data_dir, index_dir=args.feat_cache)  # rank 0 lists, the others receive
    spec = EncoderSpec.from_flags(args)
    encoder = spec.build(dist_util.dev())  # a mistake in the encoder flags stops us before any write
    logger.configure(dir=args.feat_cache, format_strs="stdout")
    listing.save(args.feat_cache)
    kept, feats = prepare_feature_cache(
        args.feat_cache, args.data_dir, listing.files, spec, make_encoder=lambda: encoder,
        batch_size=args.batch_size, num_workers=args.num_workers, precision=args.encoder_precision,
        dtype=args.feat_cache_dtype, progress=args.progress,
    )
    logger.log(f"{len(kept)} images cached, representation width {feats.shape[-1]}")
    dist_util.cleanup()


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """`rcdm cache`: the exit status."""
    return run_command(cache, create_argparser(prog), argv)
