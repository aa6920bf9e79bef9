"""Building a ready-to-sample RCDM (frozen encoder, UNet, diffusion) from a checkpoint.

`load_components(model_path, ...)` takes plain keyword arguments. A checkpoint that records its
flags (the project's own, or a published one through `published_meta`) decides the architecture,
and its recorded encoder is used unless an encoder is named. Without `model_path` the published
checkpoint for `type_model`/`use_head` comes through the hub cache (or `RCDM_MIRROR`). The
command-line layer (`cli.sampling`) maps its flags onto these arguments.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from . import hub
from .encoders import EncoderSpec
from .encoders.spec import FLAGS as ENCODER_FLAGS
from .errors import UsageError
from .get_rcdm_models import load_rcdm_checkpoint
from .precision import default_device, device_problem, resolve_precision, set_fp32_math
from .script_util import create_model_and_diffusion, model_and_diffusion_defaults

# Flags chosen at sampling time even when the checkpoint records a value for them: the respacing
# is a sampling choice, and these two only change speed (precision, gradient checkpointing).
SAMPLING_TIME_FLAGS = ("timestep_respacing", "use_fp16", "use_checkpoint")


@dataclass
class Components:
    """Everything sampling needs, built from the checkpoint and the caller's choices."""

    encoder: torch.nn.Module
    model: torch.nn.Module
    diffusion: Any
    device: torch.device
    precision: str
    model_flags: dict
    encoder_spec: EncoderSpec
    meta: dict = field(default_factory=dict)
    model_path: str = ""  # the checkpoint file ("" for a published one)

    @property
    def ssl_dim(self) -> int:
        return int(self.model_flags["ssl_dim"])

    @property
    def encoder_info(self) -> dict:
        """The encoder's record (`EncoderSpec.to_dict`)."""
        return self.encoder_spec.to_dict()


def resolve_device(name: str | torch.device | None) -> torch.device:
    """`name` ("cpu", "cuda", "cuda:1", ...), or a GPU when there is one."""
    if not name:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"`device` {name!r} is not a device name (use cpu, cuda or cuda:N): {err}") from None
    problem = device_problem(device)
    if problem:
        raise UsageError(f"`device` {name}: {problem}")
    return device


def _same(a: Any, b: Any) -> bool:
    return str(a).replace(" ", "") == str(b).replace(" ", "")


def resolve_model_flags(meta: dict, given: dict | None = None) -> dict:
    """The model and diffusion flags to build: the checkpoint's when it records them.

    `given` holds the flags the caller chose (the rest take `model_and_diffusion_defaults`). With
    a recorded checkpoint they only choose `SAMPLING_TIME_FLAGS`; a given architecture flag that
    differs from the checkpoint's is reported and ignored, since the weights fix the architecture.
    """
    defaults = model_and_diffusion_defaults()
    given = {k: v for k, v in (given or {}).items() if k in defaults}
    chosen = {**defaults, **given}
    saved = meta.get("model_flags") or {}
    if not saved:
        return {**chosen, "feat_cond": True, "ssl_dim": None}
    if saved.get("feat_cond") is False:
        raise UsageError(
            "`model_path`: this checkpoint was trained without `feat_cond` (an unconditional model); "
            "RCDM sampling needs a representation-conditioned model"
        )
    flags = {k: saved.get(k, defaults[k]) for k in defaults}
    for k in SAMPLING_TIME_FLAGS:
        flags[k] = chosen[k]
    ignored = [
        f"--{k} {given[k]} (checkpoint: {saved[k]})"
        for k in given
        if k in saved and k not in SAMPLING_TIME_FLAGS and not _same(given[k], saved[k])
    ]
    if ignored:
        warnings.warn(
            "the checkpoint records its model flags, which are used instead of: " + ", ".join(ignored),
            stacklevel=3,
        )
    flags["feat_cond"] = True
    flags["ssl_dim"] = saved.get("ssl_dim")
    return flags


def check_model_path(path: str) -> None:
    """Fail early when `model_path` names a local file that does not exist."""
    if path and "://" not in path and not os.path.isfile(path):
        raise UsageError(f"`model_path` {path}: no such file; pass an RCDM checkpoint, or leave it out "
                         "to download the published model for `type_model`")


def _describe_encoder(spec: EncoderSpec) -> str:
    return f"`type_model` {spec.name}" + (" `use_head`" if spec.use_head else "")


# The keywords of `load_components` that choose the encoder over the checkpoint's record: the
# encoder's flags (`EncoderSpec` field -> flag).
ENCODER_KEYWORDS = tuple(ENCODER_FLAGS.values())


def load_components(
    model_path: str = "",
    *,
    type_model: str | None = None,
    use_head: bool | None = None,
    encoder_normalize: str | None = None,
    pretrained_encoder: bool | None = None,
    encoder_pooling: str | None = None,
    encoder_input_size: int | None = None,
    encoder_weights: str | None = None,
    device: str | torch.device | None = None,
    precision: str | None = None,
    tf32: bool = False,
    model_flags: dict | None = None,
    G_shared: bool = False,
    encoder: EncoderSpec | None = None,
) -> Components:
    """Build the frozen encoder, the UNet (weights loaded, eval mode) and the diffusion.

    :param model_path: an RCDM checkpoint (the project's, a published-style state dict, or
        `.safetensors`); empty: the published checkpoint for `type_model`/`use_head` (the README's
        `$MODEL_FLAGS_128`), downloaded once into the cache.
    :param type_model, use_head, encoder_normalize, pretrained_encoder, encoder_pooling,
        encoder_input_size, encoder_weights: the encoder (`EncoderSpec`'s fields); None takes the checkpoint's
        record, else dino's trunk, pretrained, with the encoder's own input scaling and size.
    :param encoder: the whole encoder at once (an `EncoderSpec`), instead of the four above.
    :param model_flags: model/diffusion flags for checkpoints that do not record theirs, and the
        sampling-time ones (`timestep_respacing`, `use_fp16`, `use_checkpoint`).
    :param precision: fp32, bf16, fp16 or auto (None: fp16 with `use_fp16` on GPU, else fp32).
    """
    device = resolve_device(device)
    set_fp32_math(tf32)
    model_flags = dict(model_flags or {})
    precision = resolve_precision(precision or None, bool(model_flags.get("use_fp16", False)), device)
    check_model_path(model_path)
    state_dict, meta = load_rcdm_checkpoint(
        model_path, type_model or (encoder.name if encoder else EncoderSpec.name),
        bool(encoder.use_head if encoder else use_head)
    )
    flags = resolve_model_flags(meta, model_flags)
    recorded = meta.get("encoder") or None
    if encoder is None:
        given = {"name": type_model, "use_head": use_head, "input_normalize": encoder_normalize,
                 "pretrained": pretrained_encoder, "pooling": encoder_pooling or None,
                 "input_size": encoder_input_size or None, "weights": encoder_weights or None}
        encoder = EncoderSpec.resolve(given, recorded)

    frozen = encoder.build(device)
    spec = frozen.spec
    if flags["ssl_dim"] is None:
        flags["ssl_dim"] = spec.width
    elif int(flags["ssl_dim"]) != spec.width:
        raise UsageError(
            f"{_describe_encoder(spec)} gives {spec.width}-d representations, but "
            f"the checkpoint is conditioned on {flags['ssl_dim']}-d ones"
            + (f" (it was trained with {_describe_encoder(EncoderSpec.from_dict(recorded))})" if recorded else "")
            + ": pick the encoder the model was trained with"
        )

    build = {k: v for k, v in flags.items() if k not in ("feat_cond", "ssl_dim")}
    # Built on the meta device: no time spent on a random init the checkpoint overwrites.
    with torch.device("meta"):
        model, diffusion = create_model_and_diffusion(
            **build, feat_cond=True, ssl_dim=int(flags["ssl_dim"]), G_shared=G_shared
        )
    try:
        hub.load_state_dict_checked(model, state_dict, meta=meta or None, strict=True, assign=True)
    except hub.CheckpointMismatchError as err:
        if "NaN" not in str(err) or not model_path:
            raise
        raise hub.CheckpointMismatchError(f"`model_path` {model_path}: {err}") from None
    model.to(device).eval()
    return Components(frozen, model, diffusion, device, precision, flags, spec, meta, model_path)
