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
import inspect
from collections.abc import Sequence

from .. import foundations, hub
from ..config import MODEL_FLAGS, ModelConfig
from ..encoders import EncoderSpec
from .. import training
from .flags import ENCODER_FLAGS, ORIGINAL_NO_EFFECT, SPEED_FLAGS, Parser, add_flags
from .policy import run_command

TRAIN_FLAGS = ("data_dir", "out_dir", "feat_cond", *ENCODER_FLAGS, "schedule_sampler", "lr", "weight_decay",
               "lr_anneal_steps", "batch_size", "microbatch", "ema_rate", "log_interval", "save_interval",
               "resume_checkpoint", "fp16_scale_growth")
NEW_TRAIN_FLAGS = ("init_from", "init_lr_scale", "train_only", "train_only_steps", "init_fit_images",
                   "feat_cache", "feat_cache_dtype",
                   *SPEED_FLAGS, "encoder_precision", "max_steps", "max_minutes", "num_workers", "random_crop",
                   "random_flip", "seed", "progress", "sync_bn")


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


def explicit_model_flags(args: argparse.Namespace) -> frozenset[str]:
    """The model flags the user gave: the command line's record (`args.explicit`), else (a
    namespace made elsewhere) those whose value is not the default."""
    given = getattr(args, "explicit", None)
    if given is not None:
        return frozenset(given)
    return frozenset(k for k, f in MODEL_FLAGS.items() if getattr(args, k, f.default) != f.default)


def model_config(args: argparse.Namespace) -> tuple[ModelConfig, list[str]]:
    """The model the flags describe: a named `--init_from` sets the flags it needs, except those
    the user gave; and the log lines that say so."""
    flags = {k: getattr(args, k) for k in MODEL_FLAGS}
    notes = []
    if args.init_from:
        changed = foundations.apply_foundation_flags(flags, args.init_from, explicit_model_flags(args))
        flags.update(changed)
        if changed:
            notes.append(f"--init_from {args.init_from} sets {hub.format_flags(changed)} (flags given on the "
                         "command line win)")
    return ModelConfig(**flags, feat_cond=bool(args.feat_cond)), notes


def check_inputs(args: argparse.Namespace):
    """`training.check_inputs` for the flags (a launcher that queues the job checks first)."""
    config, _ = model_config(args)
    spec = EncoderSpec.from_flags(args) if args.feat_cond else None
    return training.check_inputs(args.data_dir, args.out_dir, model=config, encoder=spec, feat_cache=args.feat_cache,
                                 resume_checkpoint=args.resume_checkpoint, init_from=args.init_from,
                                 init_lr_scale=args.init_lr_scale, train_only=args.train_only,
                                 train_only_steps=args.train_only_steps, init_fit_images=args.init_fit_images)


def train(args: argparse.Namespace):
    """Run `training.train` with the flags' values."""
    config, notes = model_config(args)
    spec = EncoderSpec.from_flags(args)  # encoder flags that cannot apply (e.g. --use_head without a head)
    # Every keyword of `train` that is a flag of the same name takes the flag's value.
    given = {k: getattr(args, k) for k in inspect.signature(training.train).parameters if hasattr(args, k)}
    return training.train(**given, model=config, encoder=spec if args.feat_cond else None, notes=notes)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """`rcdm train` / scripts/image_train.py: the exit status."""
    return run_command(train, create_argparser(prog), argv)
