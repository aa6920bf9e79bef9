r"""Train a representation-conditioned diffusion model (RCDM) on a folder of images.

    python scripts/image_train.py $MODEL_FLAGS_128 $TRAIN_FLAGS --feat_cond --data_dir DATA \
        --type_model dino --out_dir RUN

Launch it the same way with torchrun, srun, mpiexec or run_with_submitit.py: the process group
comes from the launcher's environment. Rerunning the command resumes from the newest complete
checkpoint in --out_dir. SIGTERM, SIGINT, SIGUSR1 or SIGUSR2 (a scheduler's warning before a time
limit or preemption) makes it finish the step, save and exit. See docs/training.md.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence

import blobfile as bf
import numpy as np
import torch

from .. import dist_util, foundations, hub, logger
from ..encoders import EncoderSpec
from ..errors import MissingInputError
from ..feature_cache import prepare_feature_cache
from ..fileio import RunLockedError, UnwritableFolderError
from ..image_datasets import ImageListing, default_num_workers, load_data, scan_images
from ..precision import resolve_precision, set_fp32_math
from ..resample import create_named_schedule_sampler
from ..script_util import (
    MODEL_FLAGS,
    args_to_dict,
    check_diffusion_flags,
    check_model_flags,
    create_model_and_diffusion,
    recorded_model_flags,
)
from ..run_control import lock_out_dir
from ..train_util import TrainLoop, check_resume_weights, conditioned_batches, list_checkpoint_steps
from .flags import ENCODER_FLAGS, ORIGINAL_NO_EFFECT, SPEED_FLAGS, Parser, add_flags
from .policy import check_out_dir, run_command

DEFAULT_SSL_DIM = 2048  # the original's width when training without --feat_cond
TRAIN_FLAGS = ("data_dir", "out_dir", "feat_cond", *ENCODER_FLAGS, "schedule_sampler", "lr", "weight_decay",
               "lr_anneal_steps", "batch_size", "microbatch", "ema_rate", "log_interval", "save_interval",
               "resume_checkpoint", "fp16_scale_growth")
NEW_TRAIN_FLAGS = ("init_from", "feat_cache", "feat_cache_dtype", *SPEED_FLAGS, "encoder_precision",
                   "max_steps", "max_minutes", "num_workers", "random_crop", "random_flip", "seed", "progress",
                   "sync_bn")


def create_argparser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=__doc__)
    add_flags(parser, *TRAIN_FLAGS, defaults={"batch_size": 1}, helps={
        "out_dir": "folder for logs and checkpoints (a rerun resumes from its newest checkpoint)",
        "batch_size": "images per step, over all microbatches, per process",
        "encoder_normalize": "encoder input scaling (default: the encoder's own: minus_one_one for the "
                             "published encoders, imagenet for torchvision models); recorded in the checkpoint",
    })
    add_flags(parser.add_argument_group("model"), *MODEL_FLAGS)
    add_flags(parser.add_argument_group("beyond the original"), *NEW_TRAIN_FLAGS, helps={
        "precision": "UNet compute precision: auto (the fastest on this machine, measured; recommended), fp32, "
                     "bf16 or fp16 (default: fp32; with --use_fp16 True fp16 on GPU, bf16 on CPU)",
        "seed": "seed of the data order, crops, flips, timesteps and noise (per rank and step, so a resumed "
                "run continues the same streams)",
        "encoder_precision": "the frozen encoder's compute precision, separate from the UNet's: fp32 (exact, "
                             "default), auto (bf16 only where this machine runs it natively and faster), bf16 "
                             "or fp16; part of a --feat_cache's identity",
    })
    add_flags(parser.add_argument_group("the original's, no effect"), *ORIGINAL_NO_EFFECT)
    return parser


def check_model_flags_of(args: argparse.Namespace) -> None:
    """The model flags of `args` can build a model (`UsageError` naming the flag otherwise)."""
    # ssl_dim is measured from the encoder later; everything else is checked before heavy work.
    check_model_flags(**{k: getattr(args, k) for k in MODEL_FLAGS}, feat_cond=bool(args.feat_cond))
    check_diffusion_flags(**{k: getattr(args, k) for k in ("diffusion_steps", "noise_schedule", "timestep_respacing")})


def check_inputs(args) -> ImageListing:
    """The data folder's images, once the folder and the model flags are known to work; else a
    UsageError naming the flag. Runs before anything is written; rank 0 alone lists the folder
    (or reuses the listing a previous run left in --out_dir, see `ImageListing`)."""
    listing = scan_images(args.data_dir, index_dir=args.out_dir)
    check_model_flags_of(args)
    EncoderSpec.from_flags(args)  # encoder flags that cannot apply (e.g. --use_head without a head)
    if args.feat_cache:
        check_out_dir(args.feat_cache, "--feat_cache")  # a folder; not a file, nor under one
    if args.resume_checkpoint and not bf.exists(args.resume_checkpoint):
        raise MissingInputError(f"--resume_checkpoint {args.resume_checkpoint}: no such file")
    check_resume_weights(args.out_dir, args.resume_checkpoint)  # unreadable or NaN: before the log opens
    return listing


def explicit_model_flags(args: argparse.Namespace) -> frozenset[str]:
    """The model flags the user gave: the command line's record (`args.explicit`), else (a
    namespace made elsewhere) those whose value is not the default."""
    given = getattr(args, "explicit", None)
    if given is not None:
        return frozenset(given)
    return frozenset(k for k, f in MODEL_FLAGS.items() if getattr(args, k, f.default) != f.default)


def set_foundation_flags(args: argparse.Namespace) -> dict:
    """Set on `args` the model flags a named `--init_from` needs, except those the user gave;
    returns what it set (nothing for a file)."""
    if not args.init_from:
        return {}
    flags = args_to_dict(args, MODEL_FLAGS)
    changed = foundations.apply_foundation_flags(flags, args.init_from, explicit_model_flags(args))
    for key, value in changed.items():
        setattr(args, key, value)
    return changed


def load_init_from(args: argparse.Namespace) -> foundations.FoundationWeights | str | None:
    """Read `--init_from` (downloading a named foundation once) and check, on the meta device, that
    it fits the model the flags build."""
    if not args.init_from:
        return None
    if args.resume_checkpoint or list_checkpoint_steps(args.out_dir):
        return args.init_from  # the run resumes: TrainLoop says that --init_from is ignored
    weights = foundations.load_foundation(args.init_from, progress=args.progress)
    # Any representation width fits (ssl_emb is made for it): the check uses the default one.
    foundations.check_fits(weights, lambda: create_model_and_diffusion(
        **args_to_dict(args, MODEL_FLAGS), feat_cond=args.feat_cond, ssl_dim=DEFAULT_SSL_DIM)[0])
    return weights


def train(args: argparse.Namespace) -> None:
    dist_util.setup_dist()
    # Cheap checks first: a mistake in the flags or the data writes nothing and builds nothing.
    init_flags = set_foundation_flags(args)
    listing = check_inputs(args)
    image_paths = listing.files
    # The foundation next: a missing name offline, an unsafe file or one that does not fit the
    # flags fails before anything is written.
    init_weights = load_init_from(args)
    # The encoder next (unless a feature cache may make it unneeded): a file that is not an
    # encoder, or weights that cannot be downloaded, fail before the output folder is touched.
    spec = EncoderSpec.from_flags(args)
    encoder = spec.build(dist_util.dev()) if args.feat_cond and not args.feat_cache else None  # frozen
    precision = resolve_precision(args.precision, args.use_fp16, dist_util.dev())  # fp16 on a CPU: refused
    encoder_precision = resolve_precision(args.encoder_precision, device=dist_util.dev())
    # One run per folder, and a folder we can write to, before anything else touches it.
    notes: list[str] = []
    try:
        run_lock = lock_out_dir(args.out_dir, warn=notes.append)
    except (RunLockedError, UnwritableFolderError) as err:
        raise type(err)(f"--out_dir: {err}") from None
    logger.configure(dir=args.out_dir)
    listing.save(args.out_dir)  # a requeued job reads it instead of listing the data folder again
    for note in notes:
        logger.warn(note)
    if init_flags:
        logger.log(f"--init_from {args.init_from} sets {hub.format_flags(init_flags)} (flags given on the "
                   "command line win)")
    seed = args.seed + dist_util.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)  # the schedule sampler draws timesteps with numpy
    random.seed(seed)
    logger.log(
        f"{dist_util.get_world_size()} process(es) launched by {dist_util.launcher()}, "
        f"this one on {dist_util.dev()}"
    )

    set_fp32_math(args.tf32, fixed_shapes=True)  # a training batch always has the same shape
    if args.num_workers is None:
        args.num_workers = default_num_workers()
    logger.log(f"{len(image_paths)} images in {args.data_dir}; precision {precision} "
               f"(encoder {encoder_precision}); {args.num_workers} data loading process(es) per rank")

    features, ssl_dim = None, DEFAULT_SSL_DIM
    if args.feat_cond:
        if args.feat_cache:
            image_paths, features = prepare_feature_cache(
                args.feat_cache, args.data_dir, image_paths, spec,
                batch_size=max(args.batch_size, 16), num_workers=args.num_workers, precision=encoder_precision,
                dtype=args.feat_cache_dtype, progress=args.progress,
            )
            spec = spec.with_width(features.shape[-1])
        else:
            spec = encoder.spec
        ssl_dim = spec.width
        logger.log(f"encoder {spec.describe()}")

    logger.log("creating model and diffusion...")
    model_flags = args_to_dict(args, MODEL_FLAGS)
    model, diffusion = create_model_and_diffusion(**model_flags, feat_cond=args.feat_cond, ssl_dim=ssl_dim)
    if args.sync_bn and dist_util.get_world_size() > 1:
        # Conditional batch norm statistics over the global batch instead of each rank's share.
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(dist_util.dev())
    schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)

    logger.log("creating data loader...")
    stream = load_data(
        data_dir=args.data_dir, batch_size=args.batch_size, image_size=args.image_size,
        class_cond=args.class_cond, random_crop=args.random_crop, random_flip=args.random_flip,
        num_workers=args.num_workers, encoder_normalize=spec.input_normalize,
        features=features, image_paths=image_paths, seed=args.seed,
        encoder_size=spec.input_size if encoder is not None else None,
    )
    data = conditioned_batches(stream, encoder, dist_util.dev(), encoder_precision)

    meta = {
        "model_flags": recorded_model_flags(model_flags, feat_cond=args.feat_cond, ssl_dim=ssl_dim),
        "encoder": spec.to_dict() if args.feat_cond else None,
        "train_flags": {k: getattr(args, k) for k in (
            "lr", "weight_decay", "lr_anneal_steps", "batch_size", "microbatch", "ema_rate",
            "schedule_sampler", "use_fp16", "fp16_scale_growth", "data_dir", "feat_cache", "init_from",
        )} | {"precision": precision, "encoder_precision": encoder_precision,
              "world_size": dist_util.get_world_size()},
    }
    logger.log("training...")
    loop = TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        batch_size=args.batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        ema_rate=args.ema_rate,
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        resume_checkpoint=args.resume_checkpoint,
        use_fp16=args.use_fp16,
        fp16_scale_growth=args.fp16_scale_growth,
        schedule_sampler=schedule_sampler,
        weight_decay=args.weight_decay,
        lr_anneal_steps=args.lr_anneal_steps,
        out_dir=args.out_dir,
        precision="auto" if args.precision == "auto" else precision,  # auto: also its kernel choices
        checkpoint_meta=meta,
        max_steps=args.max_steps,
        max_seconds=60.0 * args.max_minutes,
        progress=args.progress,
        channels_last=args.channels_last,
        compile=args.compile,
        seed=args.seed,
        init_from=init_weights,
    )
    del init_weights  # the foundation's tensors are in the model now: free the file's copy
    loop.run_loop()
    if stream.bad_files:
        logger.warn(f"{len(stream.bad_files)} unreadable image(s) were skipped on this rank")
    logger.log("done.")
    if run_lock is not None:
        run_lock.release()
    dist_util.cleanup()


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """`rcdm train` / scripts/image_train.py: the exit status."""
    return run_command(train, create_argparser(prog), argv)
