"""TrainLoop: the diffusion training loop, from one CPU process to many GPUs.

What one step does: draw timesteps for the whole batch (uniform or loss-second-moment), split it
into microbatches, run the diffusion loss of each under `torch.autocast` (bf16 or fp16) or in fp32,
accumulate gradients so that the step equals the full batch's mean gradient (DDP synchronises only
on the last microbatch), take an AdamW step (through a GradScaler in fp16), then move every EMA.

Files in `out_dir`, written by rank 0, for step S (the number of optimizer steps done):
`ema_<rate>_S.pt` for each rate, `optS.pt` (optimizer, grad scaler, sampler, step), then
`modelS.pt`. Every file is written to a temporary name and renamed, and the model file comes last,
so a `modelS.pt` on disk means step S is complete. Model and EMA files record the flags and the
encoder they need (`meta`). Resuming takes the newest step whose files all load, skipping damaged
ones with a warning.

A stop signal (SIGTERM, SIGINT, SIGUSR1, submitit's preemption) does not kill the run: the current
step finishes, a checkpoint is saved, then the signal is passed on. The run lock, the signals and
the stop rule every rank agrees on live in `run_control` (their names stay importable from here).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
from typing import Iterator, Optional

import blobfile as bf
import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from . import dist_util, fileio, hub, logger
from .encoders import encode_views
from .errors import MissingInputError, UsageError
from .precision import (  # noqa: F401 (re-exported)
    PRECISIONS, autocast, prepare_model, resolve_precision, resolve_speed, set_fused_attention,
)
from .resample import LossAwareSampler, UniformSampler
from .run_control import StopOnSignal, StopRule, lock_out_dir, signal_name, stop_signals  # noqa: F401 (re-exported)

INITIAL_LOG_LOSS_SCALE = 20.0  # the original's starting fp16 loss scale, 2**20
TRAIN_STATE_FORMAT = "rcdm-train-state-v1"
_MODEL_RE = re.compile(r"^model(\d+)\.pt$")
# what an interrupted atomic save leaves behind (`fileio.temp_name`: `.<name>.<host>.<pid>.<hex>.tmp`)
_STALE_TMP_RE = re.compile(r"^\.(model\d+|opt\d+|ema_[0-9.]+_\d+)\.pt\..+\.tmp$")


# ------------------------------------------------------------------------------- features


class ConditionedBatches:
    """Turn `(images, encoder_images, kwargs)` batches into the `(images, cond)` pairs TrainLoop
    eats, with `cond["feat"]` computed by the frozen `encoder` (skipped when `kwargs` already holds
    cached features or there is no encoder) in the encoder's own `precision` (default fp32, whatever
    the UNet trains in: representations condition every sample, so they are exact unless asked).
    `resume_at` is passed on to the stream."""

    def __init__(self, stream, encoder: Optional[nn.Module], device, precision: str = "fp32"):
        self.stream, self.encoder, self.device, self.precision = stream, encoder, device, precision
        self._batches = iter(stream)

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        images, big, kwargs = next(self._batches)
        if self.encoder is not None and "feat" not in kwargs:
            kwargs["feat"] = encode_views(self.encoder, big.to(self.device, non_blocking=True), self.precision)
        return images, kwargs

    def resume_at(self, batch_index: int) -> None:
        if hasattr(self.stream, "resume_at"):
            self.stream.resume_at(batch_index)


def conditioned_batches(stream, encoder: Optional[nn.Module], device, precision: str = "fp32") -> ConditionedBatches:
    """`(images, cond)` batches for TrainLoop from an `ImageStream` (see `ConditionedBatches`)."""
    return ConditionedBatches(stream, encoder, device, precision)


# ------------------------------------------------------------------------------- checkpoints


def parse_resume_step_from_filename(filename: str) -> int:
    """The step in `.../modelNNNNNN.pt` or `.../ema_R_NNNNNN.pt` (0 when there is none)."""
    m = re.search(r"(\d+)\.pt$", bf.basename(str(filename)))
    return int(m.group(1)) if m else 0


def checkpoint_paths(out_dir: str, step: int, ema_rates) -> dict:
    return {
        "model": bf.join(out_dir, f"model{step:06d}.pt"),
        "opt": bf.join(out_dir, f"opt{step:06d}.pt"),
        "ema": {rate: bf.join(out_dir, f"ema_{rate}_{step:06d}.pt") for rate in ema_rates},
    }


def list_checkpoint_steps(out_dir: str) -> list[int]:
    """Steps with a `modelNNNNNN.pt` in `out_dir`, newest first."""
    if not out_dir or not bf.isdir(out_dir):  # none yet, or a file (refused by the output check)
        return []
    # A local folder is listed without a stat of each entry: a dangling link in it is no error.
    names = bf.listdir(out_dir) if fileio.is_remote(out_dir) else os.listdir(out_dir)
    steps = [int(m.group(1)) for m in map(_MODEL_RE.match, names) if m]
    return sorted(set(steps), reverse=True)


def _load_train_state(path: str) -> dict:
    state = hub.safe_torch_load(path, map_location="cpu", mmap=True)
    if not isinstance(state, dict):
        raise UsageError(f"{path} does not hold an optimizer state")
    if state.get("format") != TRAIN_STATE_FORMAT:  # the original's bare optimizer state dict
        state = {"optimizer": state}
    return state


def load_resume_files(model_path: str, ema_rates) -> dict:
    """Load a model file and, next to it, the optimizer and EMA files of the same step.

    Returns `{"step", "model": (sd, meta), "opt": state | None, "ema": {rate: sd}, "problems": [...]}`;
    raises if the model file itself cannot be loaded. Missing or damaged companions are listed in
    `problems` (the caller decides). Local files are memory-mapped (`torch.load(mmap=True)`): a
    tensor is read when it is used, into the page cache, never copied into a second buffer.
    """
    step = parse_resume_step_from_filename(model_path)
    sd, meta = hub.load_checkpoint(model_path, map_location="cpu", mmap=True)
    if meta and isinstance(meta.get("step"), int):
        step = meta["step"]
    out = {"step": step, "path": model_path, "model": (sd, meta), "opt": None, "ema": {}, "problems": []}
    paths = checkpoint_paths(bf.dirname(model_path), step, ema_rates)
    if bf.exists(paths["opt"]):
        try:
            out["opt"] = _load_train_state(paths["opt"])
        except Exception as exc:
            out["problems"].append(f"damaged optimizer file {paths['opt']} ({type(exc).__name__}: {exc})")
    else:
        out["problems"].append(f"no optimizer file {paths['opt']}")
    for rate, path in paths["ema"].items():
        if not bf.exists(path):
            out["problems"].append(f"no EMA file {path}")
            continue
        try:
            out["ema"][rate] = hub.load_checkpoint(path, map_location="cpu", mmap=True)[0]
        except Exception as exc:
            out["problems"].append(f"damaged EMA file {path} ({type(exc).__name__}: {exc})")
    return out


def check_resume_weights(out_dir: str, resume_checkpoint: str = "") -> None:
    """Before a run writes anything: the model file it would resume from (`resume_checkpoint`, else
    the newest model file in `out_dir` that loads; damaged ones are skipped with a warning when the
    run resumes) must load and hold finite weights, else one line naming it (`hub.CheckpointError`
    or `hub.CheckpointMismatchError`). Rank 0 reads it, memory-mapped; every rank must call this,
    and every rank raises rank 0's error."""
    def check() -> None:
        if resume_checkpoint:
            sd, _ = hub.load_checkpoint(resume_checkpoint, map_location="cpu", mmap=True)
            hub.check_finite(sd, f"`resume_checkpoint` {resume_checkpoint}")
            return
        for step in list_checkpoint_steps(out_dir):
            path = checkpoint_paths(out_dir, step, ())["model"]
            try:
                sd, _ = hub.load_checkpoint(path, map_location="cpu", mmap=True)
            except Exception:  # noqa: BLE001 (skipped when the run resumes, as the loop does)
                continue
            hub.check_finite(sd, f"{path}, the newest checkpoint in `out_dir` (the run would resume from it),")
            return

    if dist_util.get_world_size() == 1:
        return check()
    error = None
    if dist_util.is_main_process():
        try:
            check()
        except Exception as exc:  # every rank raises it, none waits
            error = exc
    error = dist_util.broadcast_object(error)
    if error is not None:
        raise error


def remove_stale_temporaries(out_dir: str) -> list:
    """Delete the temporary files of checkpoint saves whose writer is dead (a crash mid-save);
    a save in progress in another process is left alone."""
    if not out_dir or not bf.exists(out_dir) or fileio.is_remote(out_dir):
        return []
    stale = [bf.join(out_dir, n) for n in bf.listdir(out_dir)
             if _STALE_TMP_RE.match(n) and fileio.writer_is_dead(n, folder=out_dir)]
    for path in stale:
        try:
            os.remove(path)
        except FileNotFoundError:
            continue
        logger.log(f"removed {path}, left by a save that was interrupted")
    return stale


def find_resume_checkpoint(out_dir: str, ema_rates=()) -> Optional[dict]:
    """The newest complete checkpoint in `out_dir` (see `load_resume_files`), or None.

    Damaged files are skipped with a warning. If no step is complete, the newest model file that
    loads is used (its optimizer/EMA start afresh, with a warning). One checkpoint at a time is
    held: an incomplete one is let go (its path kept) before the next older one is opened, and
    read again only if no complete one turns up.
    """
    fallback = None
    for step in list_checkpoint_steps(out_dir):
        path = checkpoint_paths(out_dir, step, ema_rates)["model"]
        try:
            found = load_resume_files(path, ema_rates)
        except Exception as exc:
            logger.warn(f"skipping damaged checkpoint {path} ({type(exc).__name__}: {exc})")
            continue
        if not found["problems"]:
            return found
        logger.warn(f"checkpoint {path} is incomplete: {'; '.join(found['problems'])}")
        fallback = fallback or path
        del found
    if fallback is None:
        return None
    try:
        return load_resume_files(fallback, ema_rates)
    except Exception as exc:  # changed since it was read a moment ago
        logger.warn(f"skipping damaged checkpoint {fallback} ({type(exc).__name__}: {exc})")
        return None


# ------------------------------------------------------------------------------- loop


class TrainLoop:
    """The training loop. Arguments are the original's, plus:

    :param out_dir: where checkpoints go (default: the logger's directory).
    :param precision: "auto", "fp32", "bf16" or "fp16" (None: from `use_fp16`, see
        `resolve_precision`); "auto" also applies the measured channels-last and attention choices.
    :param checkpoint_meta: what model/EMA files record (`model_flags`, `encoder`, ...).
    :param max_steps: stop once this many steps are done (0: never; `lr_anneal_steps` also stops).
    :param progress: show a tqdm bar on rank 0.
    :param channels_last: channels-last memory format (faster convolutions in bf16/fp16).
    :param compile: `torch.compile` the UNet.
    :param max_seconds: stop once this run has trained that long, and save (0: no limit); for
        a job with a wall-clock limit, so that it ends with a checkpoint rather than being killed.
        Each rank reads its own clock every step; the ranks agree on stopping (time limit or stop
        signal) about every `agree_seconds` of training, not every step (a collective each time).
    :param init_from: start a new run from a foundation (`foundations`): a name (`openai_128`,
        `rcdm_dino`, ...), a checkpoint file, or a `foundations.FoundationWeights` already read; its
        tensors are mapped onto the model (`foundations.warm_start_state_dict`) and the checkpoints
        record it (`meta["foundation"]`). Ignored (and said so) when the run resumes. The model
        flags must already describe the foundation's architecture (a name's flags:
        `foundations.FOUNDATIONS[name].flags`).
    :param train_only: "cond": for the first `train_only_steps` steps only the representation's
        path is updated (`foundations.is_conditioning_parameter`: `ssl_emb`, the residual blocks'
        embedding layers and norms), then everything; "" (default): everything from the start.
        Measured by scripts/warm_start_benchmark.py (`--cond_first_steps`; docs/training.md,
        Results); the train command's `--train_only`.
    :param init_lr_scale: after a warm start that created tensors (`ssl_emb`), AdamW has two
        parameter groups: the new tensors at `lr`, the copied ones at `lr * init_lr_scale`
        (default 1.0: every parameter at `lr`). The checkpoint's foundation record lists the new
        tensors (`meta["foundation"]["new"]`), so a resumed run rebuilds the same groups; it keeps
        the learning rates its optimizer state saved, as for `lr`. Measured by
        scripts/warm_start_benchmark.py (`--warm_lr_scales`, `--warm_new_lr_mult`; docs/training.md,
        Results); the train command's `--init_lr_scale`.
    :param seed: the random streams of step S on rank R (timesteps, noise, representation
        dropout) are seeded from `(seed, R, S)`, so a resumed run draws what an uninterrupted one
        would; None: rank 0 draws one from torch's generator (recorded in the checkpoint). A `data`
        with `resume_at(step)` (see `conditioned_batches`) also continues where it stopped.
    """

    def __init__(
        self,
        *,
        model,
        diffusion,
        data,
        batch_size,
        microbatch,
        lr,
        ema_rate,
        log_interval,
        save_interval,
        resume_checkpoint,
        use_fp16=False,
        fp16_scale_growth=1e-3,
        schedule_sampler=None,
        weight_decay=0.0,
        lr_anneal_steps=0,
        out_dir=None,
        precision=None,
        checkpoint_meta=None,
        max_steps=0,
        progress=True,
        channels_last=False,
        compile=False,
        max_seconds=0.0,
        seed=None,
        agree_seconds=2.0,
        init_from=None,
        train_only="",
        train_only_steps=0,
        init_lr_scale=1.0,
    ):
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        if not 0 <= init_lr_scale < float("inf"):
            raise UsageError(f"`init_lr_scale` {init_lr_scale}: use a number >= 0 (1: the copied weights at `lr`)")
        self.init_lr_scale = float(init_lr_scale)
        self.ema_rate = (
            [float(ema_rate)] if isinstance(ema_rate, (int, float))
            else [float(x) for x in str(ema_rate).split(",") if x.strip()]
        )
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.resume_checkpoint = resume_checkpoint or ""
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.weight_decay = weight_decay
        self.lr_anneal_steps = lr_anneal_steps
        self.max_steps = max_steps
        self.max_seconds = float(max_seconds)
        self.agree_seconds = float(agree_seconds)
        self.out_dir = out_dir or logger.get_dir()
        self.checkpoint_meta = dict(checkpoint_meta or {})
        self.init_from = init_from or None
        self.progress = progress
        self.device = dist_util.dev()
        speed = resolve_speed(precision, use_fp16, self.device, channels_last)
        self.precision, channels_last = speed.precision, speed.channels_last
        set_fused_attention(self.model, speed.fused_attention)
        self.world_size = dist_util.get_world_size()
        self.global_batch = batch_size * self.world_size

        self._seed_given = seed is not None
        if seed is None:  # one base seed for all ranks (rank 0's draw), as the checkpoint records it
            seed = dist_util.broadcast_object(int(torch.randint(0, 2**62, ()).item()))
        self.seed = int(seed)
        self.rank = dist_util.get_rank()

        self.step = 0
        self.resume_step = 0
        self.model.to(self.device)
        if channels_last:
            # Before DDP lays out its gradient buckets, the optimizer and the EMA copies are made:
            # all of them then share the parameters' channels-last layout.
            self.model.to(memory_format=torch.channels_last)
        # Every rank starts from rank 0's weights, EMA copies included.
        dist_util.sync_params(list(self.model.parameters()) + list(self.model.buffers()))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        from .foundations import TRAIN_ONLY_CHOICES, is_conditioning_parameter

        if train_only not in TRAIN_ONLY_CHOICES or train_only_steps < 0:
            raise UsageError(f"`train_only` {train_only!r} / `train_only_steps` {train_only_steps}: use `train_only` "
                             "'cond' with a number of steps >= 0, or no `train_only`")
        self.train_only_steps = int(train_only_steps) if train_only else 0
        self._held = [p for n, p in self.model.named_parameters()
                      if p.requires_grad and not is_conditioning_parameter(n)] if train_only else []
        self.opt, self._fused_opt = _adamw(self.params, lr=self.lr, weight_decay=self.weight_decay)
        # What a log line reports, kept on the device until it is written (see `_write_logs`).
        self._log_means = DeviceMeans()
        self._skipped_steps = torch.zeros((), dtype=torch.long, device=self.device)
        self._scale_used: Optional[torch.Tensor] = None
        self.scaler = None
        if self.precision == "fp16":
            self.scaler = torch.amp.GradScaler(
                self.device.type,
                init_scale=2.0**INITIAL_LOG_LOSS_SCALE,
                growth_interval=max(1, round(1.0 / fp16_scale_growth)),
            )
        self.ema_params = [[p.detach().clone() for p in self.params] for _ in self.ema_rate]
        self._lock: Optional[fileio.RunLock] = None
        self._resume()

        if self.world_size > 1:
            self.ddp_model = DDP(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                bucket_cap_mb=128,
            )
        else:
            self.ddp_model = self.model
        self.use_ddp = self.world_size > 1
        # `forward_model` is what the loss calls; `ddp_model` keeps DDP's no_sync for microbatches.
        self.forward_model = prepare_model(
            self.ddp_model, precision=self.precision, device=self.device, compile=compile
        )

    # -- resume ----------------------------------------------------------------------------
    def _hold_out_dir(self) -> None:
        """One run per `out_dir`: take its lock (rank 0), unless this loop holds it already."""
        if self._lock is None:
            self._lock = lock_out_dir(self.out_dir)

    def _release_out_dir(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _resume(self) -> None:
        # The folder is held while its files are cleaned and read, and again while training.
        if self.out_dir and bf.exists(self.out_dir):
            self._hold_out_dir()
        try:
            self._resume_held()
        finally:
            self._release_out_dir()

    def _resume_held(self) -> None:
        found, error = None, None
        if dist_util.is_main_process():
            try:
                if self.resume_checkpoint:
                    if not bf.exists(self.resume_checkpoint):
                        raise MissingInputError(f"`resume_checkpoint` {self.resume_checkpoint!r} does not exist")
                    found = load_resume_files(self.resume_checkpoint, self.ema_rate)
                    for problem in found["problems"]:
                        logger.warn(f"resuming from {self.resume_checkpoint}: {problem}")
                else:
                    remove_stale_temporaries(self.out_dir)
                    found = find_resume_checkpoint(self.out_dir, self.ema_rate)
            except Exception as exc:  # tell the other ranks instead of leaving them waiting
                if self.world_size == 1:
                    raise
                error = exc
        if self.world_size > 1 and dist_util.broadcast_object(error is not None):
            raise error if error is not None else RuntimeError("rank 0 could not read the checkpoint to resume from")
        choice = dist_util.broadcast_object(None if found is None else found["path"])
        if choice is None:
            if self.init_from is not None:
                self._warm_start()
            dist_util.barrier()
            return
        if self.init_from is not None:
            given = getattr(self.init_from, "given", self.init_from)
            logger.log(f"resuming: --init_from {given} ignored (it only starts a new run)")
        # Rank 0 alone reads the files (a requeued job of many ranks would otherwise read every
        # file once per rank from the shared filesystem); the others receive what they need.
        if found is not None:
            self._load_found(found)
        summary = None if found is None else {
            "step": found["step"], "seed": self.seed, "problems": found["problems"],
            "has_opt": found["opt"] is not None,
            "grad_scaler": (found["opt"] or {}).get("grad_scaler"),
            "schedule_sampler": (found["opt"] or {}).get("schedule_sampler"),
            "new": (self.checkpoint_meta.get("foundation") or {}).get("new") or [],
        }
        summary = dist_util.broadcast_object(summary)
        if found is None:  # rank 0 grouped its parameters before loading the optimizer's state
            self._group_params(summary["new"])
        if summary["has_opt"]:
            opt_state = dist_util.broadcast_state(self.opt.state_dict() if found is not None else None)
            if found is None:
                self.opt.load_state_dict(opt_state)
                if self._fused_opt:
                    _keep_fused(self.opt)
        if found is None:
            self.step = self.resume_step = summary["step"]
            self.seed = summary["seed"]
            if self.scaler is not None and summary["grad_scaler"]:
                self.scaler.load_state_dict(summary["grad_scaler"])
            if isinstance(self.schedule_sampler, LossAwareSampler) and summary["schedule_sampler"]:
                self.schedule_sampler.load_state_dict({k: v.numpy() for k, v in summary["schedule_sampler"].items()})
        if hasattr(self.data, "resume_at"):
            self.data.resume_at(self.step)
        elif self.data is not None:
            logger.warn("the data iterator cannot skip ahead: the resumed run reads its batches from the start")
        missing = "" if not summary["problems"] else f" (starting afresh: {'; '.join(summary['problems'])})"
        logger.log(f"resumed from checkpoint {choice} at step {self.step}{missing}")
        log_dir = logger.get_dir()
        if log_dir and self.out_dir and os.path.abspath(log_dir) == os.path.abspath(self.out_dir):
            logger.drop_rows_after("step", self.step)  # the steps redone now are logged once
        dist_util.sync_params(list(self.model.parameters()) + list(self.model.buffers()))
        for params in self.ema_params:
            dist_util.sync_params(params)
        dist_util.barrier()

    def _warm_start(self) -> None:
        """Rank 0 maps the foundation into the model; every rank then holds its weights, and the
        EMA copies start from them."""
        from . import foundations

        error, record = None, None
        if dist_util.is_main_process():
            try:
                weights = self.init_from
                if not isinstance(weights, foundations.FoundationWeights):
                    weights = foundations.load_foundation(str(weights), progress=self.progress)
                mapped = foundations.apply_warm_start(self.model, weights)
                logger.log(mapped.summary(weights.label()))
                record = {**weights.record(), "new": list(mapped.new)}
                self.init_from = weights.given  # keep no reference to the file's tensors
            except Exception as exc:
                if self.world_size == 1:
                    raise
                error = exc
        if self.world_size > 1 and dist_util.broadcast_object(error is not None):
            raise error if error is not None else RuntimeError("rank 0 could not read `init_from`")
        self.checkpoint_meta["foundation"] = dist_util.broadcast_object(record)
        self._group_params(self.checkpoint_meta["foundation"]["new"])
        dist_util.sync_params(list(self.model.parameters()) + list(self.model.buffers()))
        with torch.no_grad():
            for params in self.ema_params:
                for ema, p in zip(params, self.params):
                    ema.copy_(p)

    def _load_found(self, found: dict) -> None:
        """Put the files `load_resume_files` read into the model, EMA, optimizer and samplers."""
        sd, meta = found["model"]
        # A resumed run keeps the record of the foundation its first run started from.
        self.checkpoint_meta.pop("foundation", None)
        if (meta or {}).get("foundation"):
            self.checkpoint_meta["foundation"] = meta["foundation"]
        hub.load_state_dict_checked(self.model, sd, meta=meta, strict=True)
        self.model.to(self.device)
        self.step = self.resume_step = found["step"]
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        for rate, params in zip(self.ema_rate, self.ema_params):
            ema_sd = found["ema"].get(rate)
            source = ema_sd if ema_sd is not None else self.model.state_dict()
            with torch.no_grad():
                for name, p in zip(names, params):
                    p.copy_(source[name].to(p.device, p.dtype))
        self._group_params((self.checkpoint_meta.get("foundation") or {}).get("new") or [])
        if found["opt"] is not None:
            state = found["opt"]
            self.opt.load_state_dict(state["optimizer"])
            if self._fused_opt:
                _keep_fused(self.opt)
            # Adam's moments take their parameter's layout (load_state_dict keeps the file's).
            for p, p_state in self.opt.state.items():
                for key, value in p_state.items():
                    if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                        p_state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
            if self.scaler is not None and state.get("grad_scaler"):
                self.scaler.load_state_dict(state["grad_scaler"])
            if isinstance(self.schedule_sampler, LossAwareSampler) and state.get("schedule_sampler"):
                sampler_state = {k: v.numpy() for k, v in state["schedule_sampler"].items()}
                self.schedule_sampler.load_state_dict(sampler_state)
            if not self._seed_given and isinstance(state.get("seed"), int):
                self.seed = state["seed"]

    def _group_params(self, new: list) -> None:
        """Rebuild AdamW (before it holds any state) with two parameter groups when a warm start
        created the tensors `new`: those at `lr`, the copied ones at `lr * init_lr_scale`."""
        new = set(new)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        fresh = [p for n, p in named if n in new]
        copied = [p for n, p in named if n not in new]
        if not fresh or not copied:
            return
        groups = [{"params": fresh, "lr": self.lr, "lr_scale": 1.0},
                  {"params": copied, "lr": self.lr * self.init_lr_scale, "lr_scale": self.init_lr_scale}]
        self.opt, self._fused_opt = _adamw(groups, lr=self.lr, weight_decay=self.weight_decay)

    # -- loop ------------------------------------------------------------------------------
    def _target(self) -> Optional[int]:
        targets = [t for t in (self.lr_anneal_steps, self.max_steps) if t]
        return min(targets) if targets else None

    def run_loop(self) -> None:
        """Train until a target, the time limit or a stop signal; save at every `save_interval`
        and at the end. After a stop signal the signal is passed on once the save is done (see
        `StopOnSignal`)."""
        bar = None
        if self.progress and dist_util.is_main_process():
            bar = tqdm(
                total=self._target(), initial=self.step, desc="training", unit="step",
                dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0,
            )
        saved_at = self.step
        rule = StopRule(step=self.step, target=self._target(), max_seconds=self.max_seconds,
                        agree_seconds=self.agree_seconds, world_size=self.world_size)
        self._hold_out_dir()
        with StopOnSignal() as stop, contextlib.ExitStack() as release:
            release.callback(self._release_out_dir)
            done, signum = rule.check(self.step, stop.received)
            while not (done or signum):
                batch, cond = next(self.data)
                self._seed_step()
                loss = self.run_step(batch, cond)
                if bar is not None:
                    bar.update(1)
                if self.step % self.log_interval == 0:
                    self._write_logs()
                    if bar is not None:
                        bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
                if self.step % self.save_interval == 0:
                    self.save()
                    saved_at = self.step
                done, signum = rule.check(self.step, stop.received)
            if bar is not None:
                bar.close()
            if signum:
                logger.log(f"{signal_name(signum)} received: saving step {self.step} before stopping")
            if saved_at != self.step:
                self.save()
            if signum:
                how = ("the job is requeued and resumes from it" if stop.requeues(signum)
                       else "run the same command again to resume")
                logger.log(f"stopped by {signal_name(signum)} at step {self.step}, checkpoint saved; {how}")
                stop.pass_on(signum)

    def _seed_step(self) -> None:
        """Seed torch's and numpy's generators for this step from `(seed, rank, step)`."""
        state = np.random.SeedSequence([self.seed % 2**64, self.rank, self.step]).generate_state(3)
        torch.manual_seed((int(state[0]) << 32) | int(state[1]))
        np.random.seed(int(state[2]))

    def run_step(self, batch: torch.Tensor, cond: dict) -> torch.Tensor:
        """One optimizer step on `batch`; returns its mean (weighted) loss, a 0-d tensor on the
        device (reading it waits for the GPU: the loop does so only when it writes a log line)."""
        self._anneal_lr()
        self.opt.zero_grad(set_to_none=True)
        loss = self.forward_backward(batch, cond)
        if self.step < self.train_only_steps:
            for p in self._held:  # not updated yet (AdamW skips a parameter without gradient)
                p.grad = None
        step_taken = self._optimize()
        self._update_ema(step_taken)
        self.step += 1
        logger.logkv("step", self.step)
        logger.logkv("samples", self.step * self.global_batch)
        logger.logkv("lr", self.opt.param_groups[0]["lr"])
        return loss

    def _write_logs(self) -> dict:
        """Read the step values kept on the device (one synchronisation), then write the log line."""
        for key, (mean, count) in self._log_means.pop().items():
            logger.logkv_mean(key, mean, count)
        skipped = int(self._skipped_steps)
        self._skipped_steps.zero_()
        if self._scale_used is not None:
            logger.logkv("lg_loss_scale", math.log2(float(self._scale_used)))
        if skipped:
            logger.warn(f"{skipped} step(s) up to step {self.step} skipped: non-finite gradients")
        return logger.dumpkvs()

    def forward_backward(self, batch: torch.Tensor, cond: dict) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True)
        cond = {k: v.to(self.device, non_blocking=True) for k, v in cond.items()}
        n = batch.shape[0]
        t, weights = self.schedule_sampler.sample(n, self.device)
        noise = torch.randn_like(batch)
        total = torch.zeros((), device=self.device)
        step_losses = []
        for i in range(0, n, self.microbatch):
            sl = slice(i, i + self.microbatch)
            micro, micro_t, micro_w = batch[sl], t[sl], weights[sl]
            micro_cond = {k: v[sl] for k, v in cond.items()}
            last = i + self.microbatch >= n
            sync = contextlib.nullcontext() if (last or not self.use_ddp) else self.ddp_model.no_sync()
            with sync:
                losses = self.diffusion.training_losses(
                    self.forward_model, micro, micro_t, model_kwargs=micro_cond, noise=noise[sl]
                )
                step_losses.append(losses["loss"].detach())
                # Weight each microbatch by its share so the sum is the full batch's mean.
                loss = (losses["loss"] * micro_w).mean() * (micro.shape[0] / n)
                log_loss_dict(self.diffusion, micro_t, {k: v * micro_w for k, v in losses.items()},
                              into=self._log_means)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            total += loss.detach()
        if isinstance(self.schedule_sampler, LossAwareSampler):
            # Its weights live on the host: the step's losses are read back once (not per microbatch).
            self.schedule_sampler.update_with_local_losses(t, torch.cat(step_losses))
        return total

    def _optimize(self) -> torch.Tensor:
        """Clip nothing, step (unless a gradient is inf/NaN), and return whether it stepped, as a
        device boolean: deciding on the host would wait for the GPU at every step."""
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        grad_norm, param_norm = self._norms()
        self._log_means.add("grad_norm", grad_norm)
        self._log_means.add("param_norm", param_norm)
        finite = torch.isfinite(grad_norm)
        self._skipped_steps += ~finite
        if self.scaler is not None:
            # the scale this step used, for the log; a device tensor (get_scale() would read it back)
            self._scale_used = self.scaler._get_scale_async().clone()
            self.scaler.step(self.opt)  # skips a step with inf/NaN gradients (on the device when fused)
            self.scaler.update()
        elif self._fused_opt:
            # The fused AdamW skips its update where `found_inf` is 1, as GradScaler asks it to.
            self.opt.found_inf = (~finite).float()
            try:
                self.opt.step()
            finally:
                del self.opt.found_inf
        elif bool(finite):  # an optimizer without the fused kernel: decide on the host
            self.opt.step()
        return finite

    @torch.no_grad()
    def _norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Global L2 norms of the gradients and of the parameters, as 0-d device tensors."""
        grads = [p.grad for p in self.params if p.grad is not None]
        g = torch.stack(torch._foreach_norm(grads)).float().norm() if grads else torch.zeros((), device=self.device)
        w = torch.stack(torch._foreach_norm(self.params)).float().norm()
        return g, w

    @torch.no_grad()
    def _update_ema(self, step_taken: torch.Tensor) -> None:
        """Move each EMA towards the weights by (1 - rate), or not at all after a skipped step."""
        taken = step_taken.float()
        for rate, params in zip(self.ema_rate, self.ema_params):
            weight = taken * (1.0 - rate)  # a 0-d device tensor: no host read
            torch._foreach_lerp_(params, self.params, [weight.expand_as(p) for p in params])

    def _anneal_lr(self) -> None:
        if not self.lr_anneal_steps:
            return
        lr = self.lr * (1 - self.step / self.lr_anneal_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    # -- save ------------------------------------------------------------------------------
    def _state_dict_with(self, params) -> dict:
        """The model's state dict with `params` in place of its trainable parameters, in the
        standard (contiguous) layout whatever the training layout (`channels_last`)."""

        def saved(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)

        sd = {k: saved(v) for k, v in self.model.state_dict().items()}
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        for name, p in zip(names, params):
            sd[name] = saved(p)
        return sd

    def _meta(self, weights: str) -> dict:
        return {**self.checkpoint_meta, "step": self.step, "weights": weights}

    def save(self) -> None:
        """Write EMA, optimizer, then model files for the current step (rank 0), atomically.

        A save that fails (a full disk) removes the files of this step it already wrote, so the
        previous step stays the newest complete one, and every rank raises.
        """
        error = None
        if dist_util.is_main_process():
            try:
                self._write_checkpoint()
            except Exception as exc:
                error = exc
        failed = error is not None
        if self.world_size > 1:
            failed = bool(dist_util.max_over_ranks([failed])[0])
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"rank 0 could not save the checkpoint of step {self.step} (see its error)")

    def _checkpoint_bytes(self) -> int:
        """A lower bound of the bytes one step's files take: the model's tensors once per model and
        EMA file, the parameters twice more for AdamW's moments."""
        model = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        params = sum(p.numel() * p.element_size() for p in self.params)
        return model * (1 + len(self.ema_rate)) + 2 * params

    def _write_checkpoint(self) -> None:
        paths = checkpoint_paths(self.out_dir, self.step, self.ema_rate)
        bf.makedirs(self.out_dir)
        if not fileio.is_remote(self.out_dir):  # fail before writing anything when it cannot fit
            needed, free = self._checkpoint_bytes(), fileio.free_space(self.out_dir)
            if free is not None and free < needed:
                raise fileio.disk_full_error(paths["model"], needed)
        written = []
        try:
            for rate, params in zip(self.ema_rate, self.ema_params):
                hub.save_checkpoint(paths["ema"][rate], self._state_dict_with(params), meta=self._meta(f"ema_{rate}"))
                written.append(paths["ema"][rate])
            state = {
                "format": TRAIN_STATE_FORMAT,
                "step": self.step,
                "optimizer": self.opt.state_dict(),
                "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "schedule_sampler": _sampler_state(self.schedule_sampler),
                "seed": self.seed,
            }
            hub.atomic_torch_save(state, paths["opt"])
            written.append(paths["opt"])
            hub.save_checkpoint(paths["model"], self._state_dict_with(self.params), meta=self._meta("model"))
        except BaseException:
            for path in written:  # no orphan companions of a step that was never completed
                with contextlib.suppress(OSError):
                    bf.remove(path)
            raise
        logger.log(f"saved checkpoint {paths['model']} (step {self.step})")


def _sampler_state(sampler) -> Optional[dict]:
    if isinstance(sampler, LossAwareSampler) and hasattr(sampler, "state_dict"):
        return {k: torch.from_numpy(np.asarray(v)) for k, v in sampler.state_dict().items()}
    return None


def _adamw(params: list, **kwargs) -> tuple[torch.optim.Optimizer, bool]:
    """AdamW, fused where torch has the kernel (it can skip a step on the device); else the default."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs), True
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, **kwargs), False


def _keep_fused(opt: torch.optim.Optimizer) -> None:
    """After `load_state_dict` of a state saved by an unfused AdamW: fused again, and its step
    counters where the fused kernel wants them (float32, on the parameter's device)."""
    for group in opt.param_groups:
        group["fused"], group["foreach"] = True, None
        for p in group["params"]:
            state = opt.state.get(p)
            if state and "step" in state:
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


class DeviceMeans:
    """Running means of logged values, kept on the device and read back all at once by `pop`."""

    def __init__(self):
        # name -> (keys, sums, counts): one key per entry of the sum and count vectors
        self._groups: dict[str, tuple[list[str], torch.Tensor, torch.Tensor]] = {}

    def _accumulate(self, name: str, keys: list[str], sums: torch.Tensor, counts: torch.Tensor) -> None:
        if name in self._groups:
            _, old_sums, old_counts = self._groups[name]
            sums, counts = old_sums + sums, old_counts + counts
        self._groups[name] = (keys, sums, counts)

    def add(self, key: str, values: torch.Tensor) -> None:
        """Add every entry of `values` (any shape) to the mean of `key`."""
        values = values.detach().float().flatten()
        self._accumulate(key, [key], values.sum().reshape(1), torch.full((1,), values.numel(), device=values.device))

    def add_binned(self, key: str, values: torch.Tensor, bins: torch.Tensor, num_bins: int) -> None:
        """Add `values` [N] to the means of `key_q0 .. key_q{num_bins-1}`, each by its bin in `bins` [N]."""
        values = values.detach().float().flatten()
        # one-hot by comparison: F.one_hot reads the bins back to check them on a CPU
        onehot = (bins.flatten()[:, None] == torch.arange(num_bins, device=bins.device)).float()
        keys = [f"{key}_q{b}" for b in range(num_bins)]
        self._accumulate(f"{key}_q", keys, values @ onehot, onehot.sum(0))

    def pop(self) -> dict[str, tuple[float, float]]:
        """{key: (mean, count)} of the keys that saw values, read back in one transfer; then empty."""
        if not self._groups:
            return {}
        keys = [k for ks, _, _ in self._groups.values() for k in ks]
        sums = torch.cat([s for _, s, _ in self._groups.values()])
        counts = torch.cat([c.float() for _, _, c in self._groups.values()])
        both = torch.stack([sums, counts]).cpu().tolist()
        self._groups.clear()
        return {k: (total / count, count) for k, total, count in zip(keys, *both) if count > 0}


def log_loss_dict(diffusion, ts: torch.Tensor, losses: dict, into: DeviceMeans | None = None) -> None:
    """Log each loss term's mean and its mean per quarter of the diffusion (`<term>_q0..q3`).

    With `into`, the values are added to it on the device (the training loop writes them at its log
    interval); without, they are logged at once (which reads them back from the device).
    """
    quartiles = (4 * ts.detach() // diffusion.num_timesteps).long()
    means = into if into is not None else DeviceMeans()
    for key, values in losses.items():
        means.add(key, values)
        means.add_binned(key, values, quartiles, 4)
    if into is None:
        for key, (mean, count) in means.pop().items():
            logger.logkv_mean(key, mean, count)


get_blob_logdir = logger.get_dir  # the original's name (its users may call it)
