"""Train a representation-conditioned diffusion model (RCDM) on a folder of images.

    python scripts/image_train.py $MODEL_FLAGS_128 $TRAIN_FLAGS --feat_cond --data_dir DATA \
        --type_model dino --out_dir RUN

Launch it the same way with torchrun, srun, mpiexec or run_with_submitit.py: the process group
comes from the launcher's environment. Rerunning the command resumes from the newest complete
checkpoint in --out_dir. SIGTERM, SIGINT, SIGUSR1 or SIGUSR2 (a scheduler's warning before a time
limit or preemption) makes it finish the step, save and exit. See docs/training.md.
"""

from __future__ import annotations

import argparse
import inspect
import os
import random
import sys

if __package__ in (None, ""):  # `python scripts/image_train.py` from anywhere
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from guided_diffusion_rcdm import dist_util, logger
from guided_diffusion_rcdm.encoders import EncoderSpec
from guided_diffusion_rcdm.feature_cache import prepare_feature_cache
from guided_diffusion_rcdm.loading import UsageError
from guided_diffusion_rcdm.image_datasets import default_num_workers, find_images, load_data
from guided_diffusion_rcdm.precision import PRECISION_CHOICES, add_tf32_arg, set_fp32_math
from guided_diffusion_rcdm.resample import create_named_schedule_sampler
from guided_diffusion_rcdm.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    check_model_flags,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    str2bool,
)
from guided_diffusion_rcdm.fileio import DiskFullError, RunLockedError, UnsafePathError, UnwritableFolderError
from guided_diffusion_rcdm.train_util import TrainLoop, conditioned_batches, lock_out_dir, resolve_precision

DEFAULT_SSL_DIM = 2048  # the original's width when training without --feat_cond


def create_argparser() -> argparse.ArgumentParser:
    defaults = dict(
        data_dir="",
        schedule_sampler="uniform",
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,
        batch_size=1,
        microbatch=-1,  # -1 disables microbatches
        ema_rate="0.9999",  # comma-separated list of EMA rates
        log_interval=10,
        save_interval=10000,
        resume_checkpoint="",
        use_fp16=False,
        fp16_scale_growth=1e-3,
        # accepted for the original's command lines; the launcher's environment decides
        submitit=False,
        local_rank=0,
        dist_url="env://",
    )
    defaults.update(model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    parser.add_argument("-h", "--help", action="help", help="show this help and exit")
    parser.add_argument("--out_dir", default=".", help="folder for logs and checkpoints")
    parser.add_argument("--feat_cond", action="store_true", help="condition on the encoder's representation")
    parser.add_argument("--use_head", action="store_true", help="use the encoder's projector head output")
    parser.add_argument("--no_shared", action="store_false", default=True,
                        help="the original's G_shared switch (no effect on the UNet)")
    parser.add_argument("--type_model", default="dino",
                        help="encoder: dino, simclr, barlow, vicreg, supervised, or a torchvision model name")
    add_dict_to_argparser(parser, defaults)
    new = parser.add_argument_group("beyond the original")
    new.add_argument("--pretrained_encoder", type=str2bool, default=True,
                     help="False: the encoder with fixed-seed random weights (offline tests)")
    new.add_argument("--encoder_normalize", default=None, choices=("minus_one_one", "imagenet"),
                     help="encoder input scaling (default: the encoder's own: minus_one_one for the "
                          "published encoders, imagenet for torchvision models); recorded in the checkpoint")
    new.add_argument("--feat_cache", default="",
                     help="folder of cached representations: encode the dataset once, then train from it")
    new.add_argument("--precision", default="", choices=("",) + PRECISION_CHOICES,
                     help="UNet compute precision: auto (the fastest on this machine, measured; recommended), "
                          "fp32, bf16 or fp16 (default: fp32; with --use_fp16 True fp16 on GPU, bf16 on CPU)")
    new.add_argument("--encoder_precision", default="fp32", choices=PRECISION_CHOICES,
                     help="the frozen encoder's compute precision, separate from the UNet's: fp32 (exact, "
                          "default), auto (bf16 only where this machine runs it natively and faster), bf16 "
                          "or fp16; part of a --feat_cache's identity")
    new.add_argument("--max_steps", type=int, default=0, help="stop after this many steps (0: never)")
    new.add_argument("--max_minutes", type=float, default=0.0,
                     help="stop after this many minutes of training and save a checkpoint (0: no limit); "
                          "set it under a job's time limit so the job ends with a checkpoint")
    new.add_argument("--num_workers", type=int, default=None,
                     help="data loading processes per rank (default: the CPUs each rank may use, less one, "
                          "at most 8)")
    new.add_argument("--random_crop", type=str2bool, default=False, help="random crops instead of centre crops")
    new.add_argument("--random_flip", type=str2bool, default=True, help="random horizontal flips")
    new.add_argument("--seed", type=int, default=0,
                     help="seed of the data order, crops, flips, timesteps and noise (per rank and step, "
                          "so a resumed run continues the same streams)")
    new.add_argument("--progress", type=str2bool, default=True, help="tqdm progress bar")
    new.add_argument("--channels_last", action="store_true",
                     help="channels-last memory format (faster with bf16; --precision auto decides by measuring)")
    new.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow first steps)")
    add_tf32_arg(new)
    new.add_argument("--sync_bn", type=str2bool, default=False,
                     help="with --norm_style cbn: batch statistics over all processes (SyncBatchNorm)")
    return parser


def _model_flag_check(args) -> None:
    names = inspect.signature(check_model_flags).parameters
    # ssl_dim is measured from the encoder later; everything else is checked before heavy work.
    check_model_flags(**{k: getattr(args, k) for k in names if hasattr(args, k) and k != "ssl_dim"})


def check_inputs(args) -> list[str]:
    """The data folder's images, once the folder and the model flags are known to work; else a
    UsageError naming the flag. Runs before anything is written."""
    try:
        image_paths = find_images(args.data_dir)
        _model_flag_check(args)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    return image_paths


def main(args) -> None:
    dist_util.setup_dist()
    # Cheap checks first: a mistake in the flags or the data writes nothing and builds nothing.
    image_paths = check_inputs(args)
    # One run per folder, and a folder we can write to, before anything else touches it.
    notes: list[str] = []
    try:
        run_lock = lock_out_dir(args.out_dir, warn=notes.append)
    except (RunLockedError, OSError) as err:
        raise SystemExit(f"error: --out_dir: {err}") from None
    logger.configure(dir=args.out_dir)
    for note in notes:
        logger.warn(note)
    seed = args.seed + dist_util.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)  # the schedule sampler draws timesteps with numpy
    random.seed(seed)
    logger.log(
        f"{dist_util.get_world_size()} process(es) launched by {dist_util.launcher()}, "
        f"this one on {dist_util.dev()}"
    )

    precision = resolve_precision(args.precision, args.use_fp16, dist_util.dev())
    set_fp32_math(args.tf32, fixed_shapes=True)  # a training batch always has the same shape
    if args.num_workers is None:
        args.num_workers = default_num_workers()
    encoder_precision = resolve_precision(args.encoder_precision, device=dist_util.dev())
    logger.log(f"{len(image_paths)} images in {args.data_dir}; precision {precision} "
               f"(encoder {encoder_precision}); {args.num_workers} data loading process(es) per rank")

    encoder, features, ssl_dim = None, None, DEFAULT_SSL_DIM
    spec = EncoderSpec.from_flags(args)
    if args.feat_cond:
        if args.feat_cache:
            image_paths, features = prepare_feature_cache(
                args.feat_cache, args.data_dir, image_paths, spec,
                batch_size=max(args.batch_size, 16), num_workers=args.num_workers, precision=encoder_precision,
            )
            spec = spec.with_width(features.shape[-1])
        else:
            encoder = spec.build(dist_util.dev())  # frozen: no parameter takes gradients
            spec = encoder.spec
        ssl_dim = spec.width
        logger.log(f"encoder {spec.describe()}")

    logger.log("creating model and diffusion...")
    model_flags = args_to_dict(args, model_and_diffusion_defaults().keys())
    model, diffusion = create_model_and_diffusion(
        **model_flags, feat_cond=args.feat_cond, ssl_dim=ssl_dim, G_shared=args.no_shared
    )
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
        "model_flags": {**model_flags, "feat_cond": bool(args.feat_cond), "ssl_dim": int(ssl_dim)},
        "encoder": spec.to_dict() if args.feat_cond else None,
        "train_flags": {k: getattr(args, k) for k in (
            "lr", "weight_decay", "lr_anneal_steps", "batch_size", "microbatch", "ema_rate",
            "schedule_sampler", "use_fp16", "fp16_scale_growth", "data_dir", "feat_cache",
        )} | {"precision": precision, "encoder_precision": encoder_precision,
              "world_size": dist_util.get_world_size()},
    }
    logger.log("training...")
    TrainLoop(
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
    ).run_loop()
    if stream.bad_files:
        logger.warn(f"{len(stream.bad_files)} unreadable image(s) were skipped on this rank")
    logger.log("done.")
    if run_lock is not None:
        run_lock.release()
    dist_util.cleanup()


if __name__ == "__main__":
    parser = create_argparser()
    # A bad flag value is one line too: the 40-line usage block would bury it (-h shows it).
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message}\n")
    try:
        main(parser.parse_args())
    except UsageError as err:  # the user's mistake: one line naming the flag, status 2
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except KeyboardInterrupt:  # Ctrl-C: training saved first (see TrainLoop); no traceback
        sys.exit(130)
    except (DiskFullError, UnsafePathError, UnwritableFolderError) as err:  # one line, nothing lost
        sys.exit(f"error: {err}")
