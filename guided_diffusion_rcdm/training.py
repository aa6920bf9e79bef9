"""`train(...)`: train an RCDM on a folder of images, with plain keyword arguments.

    >>> from guided_diffusion_rcdm import ModelConfig, train
    >>> run = train("photos", "runs/photos", model=ModelConfig.preset("quickstart"), encoder="dino",
    ...             batch_size=8, lr=1e-4, max_steps=1000)
    >>> run.checkpoint   # runs/photos/ema_0.9999_001000.pt, ready for RCDM.from_checkpoint

Every launcher (`rcdm train`, scripts/image_train.py, torchrun, srun, mpiexec, submitit) and the
quickstart call it. Several processes: the process group comes from the launcher's environment
(`dist_util.setup_dist`). Calling it again on the same `out_dir` resumes from the newest complete
checkpoint there. SIGTERM, SIGINT, SIGUSR1 or SIGUSR2 make it finish the step, save and return.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import blobfile as bf
import torch

from . import dist_util, foundations, logger
from .config import ModelConfig
from .encoders import EncoderSpec, encode_images
from .errors import MissingInputError, UsageError
from .feature_cache import prepare_feature_cache
from .fileio import RunLockedError, UnwritableFolderError, check_out_dir
from .image_datasets import ImageListing, default_num_workers, folder_index, load_data, scan_images
from .precision import resolve_precision, set_fp32_math
from .resample import create_named_schedule_sampler
from .run_control import lock_out_dir, seed_everything
from .train_util import TrainLoop, check_resume_weights, checkpoint_paths, conditioned_batches, list_checkpoint_steps


@dataclass
class TrainResult:
    """What a `train` call did: the step reached, the steps and seconds of this call, and the
    EMA checkpoint of the first rate at that step (the file to sample from)."""

    step: int
    steps_this_run: int
    seconds: float
    checkpoint: str


def _model_config(model: ModelConfig | str | None, init_from: Any) -> ModelConfig:
    if isinstance(model, ModelConfig):
        return model
    if isinstance(model, str):
        return ModelConfig.preset(model)
    if isinstance(init_from, str) and init_from in foundations.FOUNDATIONS:
        return ModelConfig(**foundations.FOUNDATIONS[init_from].flags)  # the foundation's architecture
    return ModelConfig.preset("published_128")


def _encoder_spec(encoder: EncoderSpec | str | dict | None) -> EncoderSpec | None:
    if encoder is None or isinstance(encoder, EncoderSpec):
        return encoder
    return EncoderSpec.from_dict(encoder) if isinstance(encoder, dict) else EncoderSpec(encoder)


def _load_init_from(init_from, model: ModelConfig, out_dir: str, resume_checkpoint: str, progress: bool):
    """The foundation's weights, checked on the meta device against `model` (any representation
    width fits: `ssl_emb` is made for it); the name itself when the run resumes (TrainLoop says the
    foundation is ignored)."""
    if not init_from or not isinstance(init_from, str):
        return init_from or None
    if resume_checkpoint or list_checkpoint_steps(out_dir):
        return init_from
    weights = foundations.load_foundation(init_from, progress=progress)
    foundations.check_fits(weights, lambda: model.build()[0])
    return weights


def check_inputs(data_dir: str, out_dir: str, *, model: ModelConfig, encoder: EncoderSpec | None,
                 image_paths: Sequence[str] | None = None, features: torch.Tensor | None = None,
                 feat_cache: str = "", resume_checkpoint: str = "", init_from: Any = None,
                 init_lr_scale: float = 1.0, train_only: str = "", train_only_steps: int = 0,
                 init_fit_images: int = 0) -> ImageListing:
    """The checks `train` makes before any work, without training: the warm-start settings, the
    images (listed, or the listing a previous run left in `out_dir`), the model settings and the
    input files. Returns the images; raises a `UserError` naming the argument otherwise. Writes
    nothing."""
    if (init_lr_scale != 1.0 or train_only) and not init_from:
        raise UsageError("`init_lr_scale` and `train_only` shape a warm start: give `init_from` too (or leave "
                         "them at 1.0 and '')")
    if bool(train_only) != (train_only_steps > 0):
        raise UsageError(f"`train_only` {train_only!r} with `train_only_steps` {train_only_steps}: give both "
                         "(e.g. 'cond' and 500) or neither")
    if init_fit_images < 0 or init_fit_images == 1 or (
            init_fit_images and not (init_from and (encoder is not None or features is not None))):
        raise UsageError(f"`init_fit_images` {init_fit_images}: give 0 (no fit) or at least 2; it fits the new "
                         "`ssl_emb` of a warm start, so it needs `init_from` and an encoder")
    if image_paths is None:
        listing = scan_images(data_dir, index_dir=out_dir)
    else:
        listing = ImageListing(data_dir, list(image_paths))
    model.replace(feat_cond=encoder is not None or features is not None).check()
    if feat_cache:
        check_out_dir(feat_cache, "`feat_cache`")  # a folder; not a file, nor under one
    if resume_checkpoint and not bf.exists(resume_checkpoint):
        raise MissingInputError(f"`resume_checkpoint` {resume_checkpoint}: no such file")
    check_resume_weights(out_dir, resume_checkpoint)  # unreadable or NaN: before the log opens
    if features is not None and (encoder is None or len(features) != len(listing.files)):
        raise UsageError(f"`features` ({len(features)} rows) needs the `encoder` that computed them and one row "
                         f"per image ({len(listing.files)} images)")
    if init_fit_images and len(folder_index(listing.files)) < 2:
        raise UsageError(f"`init_fit_images` needs the images of {data_dir} in one folder per class (their "
                         "classes are the folders, sorted, in the foundation's class order); they are in one folder")
    return listing


def _fit_images(image_paths: Sequence[str], n: int, seed: int) -> list[int]:
    """The indices of the `n` images (at most all) the `init_fit_images` fit reads: a fixed-seed
    random choice over the whole list, so every class folder can be in it; in list order."""
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(len(image_paths), generator=g)[:n].tolist())


def _fit_ssl_emb(weights: foundations.FoundationWeights, image_paths: Sequence[str], n: int, *,
                 folders: dict[str, int], encoder, features: torch.Tensor | None, precision: str, seed: int,
                 progress: bool):
    """`weights` with `ssl_emb` fitted to the class embeddings of `n` training images' classes
    (their folders' in `folders`: `folder_index` of the whole listing), from their representations
    (`features`' rows, else the frozen `encoder` on their centre crops).

    Called on every rank: each encodes its share of the images, all gather the rows (in the order
    of one process) and make the same fit, so a fit that cannot be made stops every rank alike."""
    pick = _fit_images(image_paths, n, seed)
    if features is not None:  # every rank holds the cache
        feats, kept = features[pick], pick
    else:
        share = pick[dist_util.get_rank()::dist_util.get_world_size()]
        encoded = encode_images(encoder, [image_paths[i] for i in share], precision=precision,
                                progress=progress and dist_util.is_main_process(),
                                desc="fitting ssl_emb: encoding images", warn=logger.warn)
        parts = dist_util.all_gather_objects((encoded.features.cpu(), [share[i] for i in encoded.kept]))
        kept = [i for _, part_kept in parts for i in part_kept]
        order = sorted(range(len(kept)), key=kept.__getitem__)
        feats, kept = torch.cat([f for f, _ in parts])[order], [kept[i] for i in order]
    labels = torch.tensor([folders[bf.dirname(image_paths[i])] for i in kept])
    return foundations.with_fitted_ssl_emb(weights, feats, labels)


def train(
    data_dir: str,
    out_dir: str,
    *,
    model: ModelConfig | str | None = None,
    encoder: EncoderSpec | str | dict | None = "dino",
    image_paths: Sequence[str] | None = None,
    features: torch.Tensor | None = None,
    feat_cache: str = "",
    feat_cache_dtype: str = "fp32",
    init_from: str | None = None,
    init_lr_scale: float = 1.0,
    train_only: str = "",
    train_only_steps: int = 0,
    init_fit_images: int = 0,
    max_steps: int = 0,
    max_minutes: float = 0.0,
    batch_size: int = 1,
    microbatch: int = -1,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    lr_anneal_steps: int = 0,
    ema_rate: str = "0.9999",
    log_interval: int = 10,
    save_interval: int = 10000,
    resume_checkpoint: str = "",
    schedule_sampler: str = "uniform",
    fp16_scale_growth: float = 1e-3,
    precision: str | None = None,
    encoder_precision: str = "fp32",
    channels_last: bool = False,
    compile: bool = False,
    tf32: bool = False,
    num_workers: int | None = None,
    random_crop: bool = False,
    random_flip: bool = True,
    sync_bn: bool = False,
    seed: int = 0,
    progress: bool = True,
    log_formats: str | None = None,
    notes: Sequence[str] = (),
    train_meta: dict | None = None,
    on_start: Callable[[TrainLoop], None] | None = None,
) -> TrainResult:
    """Train (or resume) an RCDM in `out_dir` on the images of `data_dir`.

    :param model: a `ModelConfig`, a preset name, or None: the architecture of a named `init_from`
        foundation, else `published_128`. Its `feat_cond`/`ssl_dim` follow the encoder.
    :param encoder: the frozen encoder (an `EncoderSpec`, its name, or its record); None trains an
        unconditional model.
    :param image_paths: the images to train on (default: every image under `data_dir`).
    :param features: their representations, already computed (N x D, one row per image): the
        encoder is then not run, only recorded.
    :param feat_cache: a folder where the representations are computed once and reused.
    :param init_from: a warm start: a UNet state-dict file, or a foundation name
        (`foundations.FOUNDATIONS`: openai_64 ... openai_512, rcdm_<encoder>[_head]).
    :param init_lr_scale: with `init_from`: the copied weights train at `lr * init_lr_scale`, the
        new `ssl_emb` at `lr` (default 1.0: everything at `lr`).
    :param train_only, train_only_steps: with `init_from`: `train_only="cond"` updates only the
        representation's path (`ssl_emb`, the residual blocks' embedding layers and norms) for the
        first `train_only_steps` steps, then everything. Both are measured in docs/training.md
        (Results: warm start vs scratch).
    :param init_fit_images: with a class-conditional `init_from` (openai_64/128/256/512): the new
        `ssl_emb` starts as the least-squares map from this many training images' representations
        (a fixed-seed random choice) to their classes' embeddings (`foundations.fit_ssl_emb`) instead
        of zero weights; an image's class is its folder's index among the sorted folders, which for
        ImageNet's train set is the foundation's class index (default 0: zero weights).
    :param max_steps, max_minutes: stop after this many steps / minutes of training (0: never),
        saving a checkpoint. `lr_anneal_steps` also ends the run (the original's).
    :param precision: the UNet's compute precision: fp32, bf16, fp16 or auto (None: fp32; with
        `model.use_fp16`, fp16 on a GPU and bf16 on a CPU). `encoder_precision` is the encoder's.
    :param seed: the data order, crops, flips, timesteps and noise (per rank and step, so a resumed
        run continues the same streams).
    :param log_formats: the logger's outputs (default: stdout, log.txt, progress.csv).
    :param notes: lines for the top of the run's log (how the settings were chosen).
    :param train_meta: more entries for the checkpoints' `train_flags` record.
    :param on_start: called with the `TrainLoop` before its first step (e.g. to tune threads).
    Other keywords are TrainLoop's (the original's training flags of the same names).
    """
    dist_util.setup_dist()
    config = _model_config(model, init_from)
    spec = _encoder_spec(encoder)
    conditioned = spec is not None or features is not None
    # Cheap checks first: a mistake in the settings or the data writes nothing and builds nothing.
    listing = check_inputs(data_dir, out_dir, model=config, encoder=spec, image_paths=image_paths,
                           features=features, feat_cache=feat_cache, resume_checkpoint=resume_checkpoint,
                           init_from=init_from, init_lr_scale=init_lr_scale, train_only=train_only,
                           train_only_steps=train_only_steps, init_fit_images=init_fit_images)
    # The foundation next: a missing name offline, an unsafe file or one that does not fit the
    # model fails before anything is written.
    init_weights = _load_init_from(init_from, config, out_dir, resume_checkpoint, progress)
    fit = init_fit_images if isinstance(init_weights, foundations.FoundationWeights) else 0
    folders = folder_index(listing.files) if fit else {}  # the classes: every folder of the listing
    if fit:
        foundations.check_fit(init_weights, len(folders))
    # The encoder next (unless its representations are given or cached): a file that is not an
    # encoder, or weights that cannot be downloaded, fail before the output folder is touched.
    device = dist_util.dev()
    built = spec.build(device) if spec is not None and features is None and not feat_cache else None  # frozen
    requested, precision = precision, resolve_precision(precision, config.use_fp16, device)  # fp16 on a CPU: refused
    encoder_precision = resolve_precision(encoder_precision, device=device)
    # One run per folder, and a folder we can write to, before anything else touches it.
    lock_notes: list[str] = []
    try:
        run_lock = lock_out_dir(out_dir, warn=lock_notes.append)
    except (RunLockedError, UnwritableFolderError) as err:
        raise type(err)(f"`out_dir`: {err}") from None
    logger.configure(dir=out_dir, format_strs=log_formats.split(",") if log_formats else None)
    listing.save(out_dir)  # a requeued job reads it instead of listing the data folder again
    for note in lock_notes:
        logger.warn(note)
    for note in notes:
        logger.log(note)
    seed_everything(seed + dist_util.get_rank())
    logger.log(f"{dist_util.get_world_size()} process(es) launched by {dist_util.launcher()}, this one on {device}")

    set_fp32_math(tf32, fixed_shapes=True)  # a training batch always has the same shape
    if num_workers is None:
        num_workers = default_num_workers()
    image_paths = listing.files
    logger.log(f"{len(image_paths)} images in {data_dir}; precision {precision} "
               f"(encoder {encoder_precision}); {num_workers} data loading process(es) per rank")

    if features is not None:
        spec = spec.with_width(features.shape[-1])
    elif feat_cache and spec is not None:
        image_paths, features = prepare_feature_cache(
            feat_cache, data_dir, image_paths, spec, batch_size=max(batch_size, 16), num_workers=num_workers,
            precision=encoder_precision, dtype=feat_cache_dtype, progress=progress,
        )
        spec = spec.with_width(features.shape[-1])
    elif built is not None:
        spec = built.spec
    if spec is not None:
        logger.log(f"encoder {spec.describe()}")
    config = config.replace(feat_cond=conditioned, ssl_dim=spec.width if spec is not None else config.ssl_dim)
    if fit:  # every rank encodes a share; rank 0's weights are the ones TrainLoop maps and sends
        init_weights = _fit_ssl_emb(init_weights, image_paths, fit, folders=folders, encoder=built,
                                    features=features, precision=encoder_precision, seed=seed, progress=progress)

    logger.log("creating model and diffusion...")
    unet, diffusion = config.build()
    if sync_bn and dist_util.get_world_size() > 1:
        # Conditional batch norm statistics over the global batch instead of each rank's share.
        unet = torch.nn.SyncBatchNorm.convert_sync_batchnorm(unet)
    unet.to(device)

    logger.log("creating data loader...")
    stream = load_data(
        data_dir=data_dir, batch_size=batch_size, image_size=config.image_size, class_cond=config.class_cond,
        random_crop=random_crop, random_flip=random_flip, num_workers=num_workers,
        encoder_normalize=spec.input_normalize if spec is not None else "minus_one_one", features=features,
        image_paths=image_paths, seed=seed, encoder_size=spec.input_size if built is not None else None,
    )
    meta = {
        "model_flags": config.to_record(),
        "encoder": spec.to_dict() if spec is not None else None,
        "train_flags": {
            "lr": lr, "weight_decay": weight_decay, "lr_anneal_steps": lr_anneal_steps, "batch_size": batch_size,
            "microbatch": microbatch, "ema_rate": ema_rate, "schedule_sampler": schedule_sampler,
            "use_fp16": config.use_fp16, "fp16_scale_growth": fp16_scale_growth, "data_dir": data_dir,
            "feat_cache": feat_cache, "init_from": init_from if isinstance(init_from, str) else None,
            "init_lr_scale": init_lr_scale, "train_only": train_only, "train_only_steps": train_only_steps,
            "init_fit_images": init_fit_images,
            "precision": precision, "encoder_precision": encoder_precision,
            "world_size": dist_util.get_world_size(), **(train_meta or {}),
        },
    }
    logger.log("training...")
    loop = TrainLoop(
        model=unet, diffusion=diffusion, data=conditioned_batches(stream, built, device, encoder_precision),
        batch_size=batch_size, microbatch=microbatch, lr=lr, ema_rate=ema_rate, log_interval=log_interval,
        save_interval=save_interval, resume_checkpoint=resume_checkpoint, use_fp16=config.use_fp16,
        fp16_scale_growth=fp16_scale_growth, schedule_sampler=create_named_schedule_sampler(schedule_sampler, diffusion),
        weight_decay=weight_decay, lr_anneal_steps=lr_anneal_steps, out_dir=out_dir,
        precision="auto" if requested == "auto" else precision, checkpoint_meta=meta,
        max_steps=max_steps, max_seconds=60.0 * max_minutes, progress=progress, channels_last=channels_last,
        compile=compile, seed=seed, init_from=init_weights, init_lr_scale=init_lr_scale, train_only=train_only,
        train_only_steps=train_only_steps,
    )
    del init_weights  # the foundation's tensors are in the model now: free the file's copy
    if on_start is not None:
        on_start(loop)
    first, start = loop.step, time.monotonic()
    loop.run_loop()
    seconds = time.monotonic() - start
    if stream.bad_files:
        logger.warn(f"{len(stream.bad_files)} unreadable image(s) were skipped on this rank")
    logger.log("done.")
    paths = checkpoint_paths(out_dir, loop.step, loop.ema_rate)
    result = TrainResult(loop.step, loop.step - first, seconds,
                         paths["ema"][loop.ema_rate[0]] if loop.ema_rate else paths["model"])
    if run_lock is not None:
        run_lock.release()
    dist_util.cleanup()
    return result
