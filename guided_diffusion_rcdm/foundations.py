"""Warm starts: train an RCDM from a published diffusion model (a *foundation*) instead of from scratch.

The RCDM UNet is guided-diffusion's UNet with the class embedding (`label_emb`, an
`Embedding(num_classes, 4 * num_channels)`) replaced by a representation embedding (`ssl_emb`, a
`Linear(ssl_dim, 4 * num_channels)`): the representation enters where the class label entered.
`--init_from` therefore starts from

- a name: one of guided-diffusion's ImageNet release files (`openai_64`, `openai_128`, `openai_256`,
  `openai_256_uncond`, `openai_512`) or one of the nine published RCDMs (`rcdm_<encoder>[_head]`,
  e.g. `rcdm_dino`, `rcdm_simclr_head`, `rcdm_supervised`), downloaded through `hub.download` (the
  torch.hub cache, `RCDM_MIRROR`, `RCDM_SHA256_<NAME>` pins, a progress bar, safe loading). A named
  foundation also sets the model flags it needs (`FOUNDATIONS[name].flags`) unless they were given;
- a file: any UNet state dict in that layout (guided-diffusion's, this project's checkpoints, the
  published RCDMs, `.safetensors`), loaded with `weights_only`.

The mapping (`warm_start_state_dict`):

- every tensor present in the foundation and the new model with the same shape is copied exactly;
- tensors the new model does not have are dropped (`label_emb.weight` when the new model is not
  class-conditional; `ssl_emb.*` and `null_feat` when it takes no representation);
- `ssl_emb.weight` that is not in the file, or is there for another representation width, starts
  at zero, and a missing `ssl_emb.bias` starts at the mean of the foundation's class embeddings
  (zero for an unconditional foundation). So, before the first update, the new model computes
  exactly what the foundation computes with the mean class embedding in place of a class's
  (an unconditional foundation: exactly its prediction), whatever the representation; the zero
  weights still receive gradients, so the representation path learns from the first step. From an
  RCDM of another width only `ssl_emb.weight` is new (its bias is kept).
- `null_feat` (`--feat_drop_prob`) starts at zero when the file has none of that width.

Optionally (`--init_fit_images N`, `with_fitted_ssl_emb`), a class-conditional foundation's new
`ssl_emb` starts instead as the least-squares map from N labelled images' representations to their
classes' embeddings (`fit_ssl_emb`): before the first update the model then computes what the
foundation computes for the class a linear probe of the representation reads, rather than for the
mean class. The tensors stay "new" (the learning rate of `init_lr_scale` still treats them so).

Any other difference (a tensor of another shape, a missing one, an extra one) means the model flags
do not describe the file's architecture: `WarmStartError` names the first such tensor and the flags
to use.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import hub
from .errors import MissingInputError, UsageError
from .config import ModelConfig, published_128, rcdm_256
from .get_rcdm_models import check_rcdm_layout, published_ssl_dim, rcdm_checkpoint_url
from .get_ssl_models import ENCODER_NAMES

OPENAI_BASE_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"

# The architecture and diffusion flags of guided-diffusion's release (its README's MODEL_FLAGS),
# less the two that describe the foundation rather than the model trained from it: `class_cond`
# (an RCDM takes a representation instead; `Foundation.class_cond` records the file's) and
# `use_fp16` (a speed choice here: --precision). The 128x128 and 256x256 ones are the presets.
def _release_flags(config: ModelConfig) -> dict[str, Any]:
    return {k: v for k, v in config.flags().items() if k not in ("class_cond", "use_fp16")}


_OPENAI_256 = _release_flags(rcdm_256())


@dataclass(frozen=True)
class Foundation:
    """A named foundation: where its file is, the model flags it needs, and whether it is
    class-conditional (then its `label_emb` is dropped and its mean seeds `ssl_emb.bias`)."""

    name: str
    url: str
    flags: dict = field(hash=False)
    class_cond: bool = False
    ssl_dim: int | None = None  # a published RCDM's representation width

    def file_name(self) -> str:
        return os.path.basename(self.url)

    def build(self, class_cond: bool | None = None) -> torch.nn.Module:
        """The UNet of the published file (its flags, classes and representation width); call it
        under `torch.device("meta")` to get the architecture alone."""
        from .script_util import create_model_and_diffusion

        return create_model_and_diffusion(
            **self.flags, class_cond=self.class_cond if class_cond is None else class_cond,
            feat_cond=self.ssl_dim is not None, ssl_dim=self.ssl_dim or 2048)[0]


def _openai(name: str, file_name: str, class_cond: bool, **flags: Any) -> Foundation:
    return Foundation(name, OPENAI_BASE_URL + file_name, flags, class_cond=class_cond)


def _published_rcdms() -> dict[str, Foundation]:
    flags = _release_flags(published_128())
    out = {}
    for encoder in ENCODER_NAMES:
        for head in ((False,) if encoder == "supervised" else (False, True)):
            name = f"rcdm_{encoder}{'_head' if head else ''}"
            out[name] = Foundation(name, rcdm_checkpoint_url(encoder, head), dict(flags),
                                   ssl_dim=published_ssl_dim(encoder, head))
    return out


FOUNDATIONS: dict[str, Foundation] = {
    f.name: f for f in (
        _openai("openai_64", "64x64_diffusion.pt", True, attention_resolutions="32,16,8", diffusion_steps=1000,
                dropout=0.1, image_size=64, learn_sigma=True, noise_schedule="cosine", num_channels=192,
                num_head_channels=64, num_res_blocks=3, resblock_updown=True, use_new_attention_order=True,
                use_scale_shift_norm=True),
        _openai("openai_128", "128x128_diffusion.pt", True, **_release_flags(published_128())),
        _openai("openai_256", "256x256_diffusion.pt", True, **_OPENAI_256),
        _openai("openai_256_uncond", "256x256_diffusion_uncond.pt", False, **_OPENAI_256),
        _openai("openai_512", "512x512_diffusion.pt", True, **{**_OPENAI_256, "image_size": 512}),
        *_published_rcdms().values(),
    )
}

# An RCDM at 256 px (the paper published none): the 256x256 foundations' architecture, as
# MODEL_FLAGS_128 is the published RCDMs'. docs/training.md gives it as a shell variable.
MODEL_FLAGS_256: dict[str, Any] = rcdm_256().flags()

# The tensors a warm start may create (`new`) or drop without the architecture differing.
NEW_OK = ("ssl_emb.weight", "ssl_emb.bias", "null_feat")
DROP_OK = ("label_emb.weight", "ssl_emb.weight", "ssl_emb.bias", "null_feat")


class WarmStartError(hub.CheckpointMismatchError):
    """The foundation's tensors do not fit the model the flags build (one line naming the first
    mismatching tensor and the flags to use)."""


def names_text() -> str:
    openai = [n for n in FOUNDATIONS if n.startswith("openai_")]
    return f"{', '.join(openai)}, rcdm_<encoder>[_head] ({', '.join(n for n in FOUNDATIONS if n.startswith('rcdm_'))})"


@dataclass
class FoundationWeights:
    """A foundation read from disk: what `--init_from` said, the name (None for a file), the
    file, its state dict and the flags it needs (a name's, or those a checkpoint of
    this project records; None when unknown)."""

    given: str
    name: str | None
    path: str
    state_dict: dict
    flags: dict | None
    fitted: dict = field(default_factory=dict)  # new tensors' starting values (`with_fitted_ssl_emb`)
    fit: dict | None = None  # how they were fitted (recorded)

    def record(self) -> dict:
        """What a checkpoint trained from it records (`meta["foundation"]`); hashes the file (once:
        `hub.file_sha256` remembers it)."""
        record = {"init_from": self.given, "name": self.name, "file": os.path.basename(self.path),
                  "sha256": hub.file_sha256(self.path)}
        return {**record, "ssl_emb_fit": self.fit} if self.fit else record

    def label(self) -> str:
        return self.name or self.path


def is_name(init_from: str) -> bool:
    return init_from in FOUNDATIONS


def apply_foundation_flags(flags: dict, init_from: str, explicit: frozenset | set = frozenset()) -> dict:
    """`flags` with a named foundation's model flags set, except those in `explicit` (given by the
    user); a file (or an empty `init_from`) changes nothing. Returns the flags it set."""
    if not init_from or not is_name(init_from):
        return {}
    changed = {}
    for key, value in FOUNDATIONS[init_from].flags.items():
        if key not in explicit and flags.get(key) != value:
            changed[key] = value
    flags.update(changed)
    return changed


def load_foundation(init_from: str, *, progress: bool = True) -> FoundationWeights:
    """Read `--init_from`: a name (downloaded once into the hub cache) or a file; safely
    (`weights_only`). Raises a `UserError` (one line) for an unknown name, a missing file, a file
    that runs code when unpickled or is not a state dict, or a failed download."""
    if is_name(init_from):
        f = FOUNDATIONS[init_from]
        # the published architecture, before the file enters the download cache
        shapes = hub.fits(f.build, f"the published {f.name} ({f.file_name()})")
        verify = ((lambda p: (check_rcdm_layout(p), shapes(p))) if f.name.startswith("rcdm_") else shapes)
        path = str(hub.download(f.url, progress=progress, verify=verify))
        flags: dict | None = dict(f.flags)
        name: str | None = f.name
    else:
        if not os.path.exists(init_from):
            if os.sep not in init_from and "." not in init_from:
                raise UsageError(f"`init_from` {init_from!r}: no such foundation name or file; the names are "
                                 f"{names_text()}")
            raise MissingInputError(f"`init_from` {init_from}: no such file")
        if os.path.isdir(init_from):
            raise UsageError(f"`init_from` {init_from}: is a folder; give a checkpoint file (e.g. "
                             f"{os.path.join(init_from, 'model010000.pt')}) or a foundation name")
        path, name, flags = init_from, None, None
    state_dict, meta = hub.load_checkpoint(path)
    if flags is None and isinstance(meta.get("model_flags"), Mapping):
        flags = {k: v for k, v in meta["model_flags"].items() if k not in ("feat_cond", "ssl_dim")}
    return FoundationWeights(init_from, name, path, state_dict, flags)


def _inferred_flags(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """The few model flags a bare state dict shows by its shapes."""
    out: dict[str, Any] = {}
    first = state_dict.get("input_blocks.0.0.weight")
    if first is not None and first.dim() == 4:
        out["num_channels"] = int(first.shape[0])
    last = state_dict.get("out.2.weight")
    if last is not None:
        out["learn_sigma"] = int(last.shape[0]) == 6
    return out


def _fix_hint(foundation: FoundationWeights | None, state_dict) -> str:
    flags = foundation.flags if foundation is not None and foundation.flags else None
    if flags:
        return f"train with the foundation's flags: {hub.format_keywords(flags)}"
    hint = hub.format_keywords(_inferred_flags(state_dict))
    return ("give the flags the file was trained with" + (f" (its shapes say {hint})" if hint else "")
            + "; see docs/training.md")


def _fmt(shape) -> str:
    return "x".join(map(str, shape)) if len(shape) else "scalar"


@dataclass
class WarmStart:
    """The state dict to load into the new model, and what the mapping did."""

    state_dict: dict
    copied: list
    dropped: list
    new: list
    fit: dict | None = None

    def summary(self, label: str) -> str:
        """The one log line: counts of copied, dropped and new tensors."""
        def names(keys):
            return f" ({', '.join(keys)})" if keys else ""
        fit = self.fit or {}
        fitted = (f"; ssl_emb fitted to the class embeddings of {fit['images']} labelled images "
                  f"({fit['classes']} classes)" if fit else "")
        return (f"warm start from {label}: {len(self.copied)} tensors copied, {len(self.dropped)} dropped"
                f"{names(self.dropped)}, {len(self.new)} new{names(self.new)}{fitted}")


def warm_start_state_dict(target: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor],
                          foundation: FoundationWeights | None = None, what: str = "`init_from`") -> WarmStart:
    """Map the foundation's `source` state dict onto a model whose state dict is `target` (its
    tensors may live on the meta device: only names, shapes and dtypes are read). See the module
    docstring for the rules; raises `WarmStartError` when the architectures differ."""
    out, copied, new = {}, [], []
    fitted = foundation.fitted if foundation is not None else {}
    hint = _fix_hint(foundation, source)
    where = f"{what} {foundation.label()}" if foundation is not None else what
    for key, want in target.items():
        have = source.get(key)
        if have is not None and tuple(have.shape) == tuple(want.shape):
            dtype = want.dtype if want.is_floating_point() else have.dtype
            out[key] = have if have.is_meta else have.detach().to("cpu", dtype).clone()
            copied.append(key)
        elif key in NEW_OK:
            value = torch.zeros(want.shape, dtype=want.dtype)
            if key in fitted and tuple(fitted[key].shape) == tuple(want.shape):
                value = fitted[key].detach().to("cpu", want.dtype).clone()
            elif key == "ssl_emb.bias" and "label_emb.weight" in source:
                classes = source["label_emb.weight"]
                if tuple(classes.shape[1:]) == tuple(want.shape):
                    value = classes.detach().double().mean(0).to(want.dtype)
            out[key] = value
            new.append(key)
        elif have is not None:
            raise WarmStartError(
                f"{where} does not fit the model flags: {key} is {_fmt(have.shape)} in the file, "
                f"{_fmt(want.shape)} in the model; {hint}")
        else:
            raise WarmStartError(f"{where} does not fit the model flags: the file has no {key} "
                                 f"({_fmt(want.shape)} in the model); {hint}")
    dropped = [k for k in source if k not in target]
    extra = [k for k in dropped if k not in DROP_OK]
    if extra:
        k = extra[0]
        raise WarmStartError(f"{where} does not fit the model flags: the model has no {k} "
                             f"({_fmt(source[k].shape)} in the file); {hint}")
    fit = foundation.fit if foundation is not None and any(k in fitted for k in new) else None
    return WarmStart(out, copied, dropped, new, fit)


def fit_ssl_emb(class_embeddings: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor,
                ridge: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear map `feats -> class_embeddings[labels]` of least squares (ridge regression).

    :param class_embeddings: C x E, a class-conditional foundation's `label_emb.weight`.
    :param feats: N x D representations of N images; `labels`: their N classes (0 <= label < C).
    :param ridge: the penalty on the weights, relative to the representations' mean variance
        (trace of their covariance / D): small fits the N images closely, large shrinks the map
        towards predicting their mean class embedding.
    :return: `ssl_emb`'s weight (E x D) and bias (E), float32: `feats @ weight.T + bias` is the
        fit. Computed in float64 on the CPU.
    """
    x = feats.detach().to("cpu", torch.float64).reshape(len(feats), -1)
    y = class_embeddings.detach().to("cpu", torch.float64)[labels.to("cpu", torch.long)]
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc = x - x_mean
    gram = xc.T @ xc
    scale = float(gram.trace()) / gram.shape[0] or 1.0
    gram.diagonal().add_(ridge * scale)
    weight = torch.linalg.solve(gram, xc.T @ (y - y_mean)).T  # E x D
    bias = y_mean - weight @ x_mean
    return weight.float().contiguous(), bias.float()


def check_fit(foundation: FoundationWeights, num_classes: int) -> None:
    """Raise `UsageError` (one line) unless `foundation` has class embeddings for `num_classes`
    classes: what `with_fitted_ssl_emb` needs, checked before any image is encoded."""
    classes = foundation.state_dict.get("label_emb.weight")
    if classes is None:
        raise UsageError(f"`init_fit_images` needs a class-conditional foundation (one with `label_emb`, e.g. "
                         f"openai_128); {foundation.label()} has no class embeddings")
    if num_classes > len(classes):
        raise UsageError(f"`init_fit_images`: {num_classes} classes (the images' folders) go beyond the "
                         f"foundation's {len(classes)} classes; use one folder per class, in the foundation's order")


def with_fitted_ssl_emb(foundation: FoundationWeights, feats: torch.Tensor, labels: torch.Tensor,
                        ridge: float = 0.1) -> FoundationWeights:
    """`foundation` whose warm start gives `ssl_emb` the `fit_ssl_emb` of `feats` (N x D) and
    `labels` (N classes of the foundation) instead of zero weights and the mean class embedding.
    Raises `UsageError` (one line) for a foundation without class embeddings or labels out of its
    range."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(labels) != len(feats) or len(labels) < 2 or int(labels.min()) < 0:
        raise UsageError(f"`init_fit_images`: {len(labels)} labels for {len(feats)} representations; give at "
                         "least two images, each with its class (>= 0)")
    check_fit(foundation, int(labels.max()) + 1)
    weight, bias = fit_ssl_emb(foundation.state_dict["label_emb.weight"], feats, labels, ridge)
    fit = {"images": len(labels), "classes": int(labels.unique().numel()), "ridge": ridge}
    return replace(foundation, fitted={"ssl_emb.weight": weight, "ssl_emb.bias": bias}, fit=fit)


def check_fits(foundation: FoundationWeights, builder) -> WarmStart:
    """Map `foundation` onto the model `builder()` makes, built on the meta device (nothing
    allocated): raises `WarmStartError` before any real work when the architectures differ."""
    with torch.device("meta"):
        model = builder()
    return warm_start_state_dict(model.state_dict(), foundation.state_dict, foundation)


@torch.no_grad()
def apply_warm_start(model: torch.nn.Module, foundation: FoundationWeights) -> WarmStart:
    """Copy the mapped foundation into `model` (in place, keeping its device and memory layout)."""
    mapped = warm_start_state_dict(model.state_dict(), foundation.state_dict, foundation)
    model.load_state_dict(mapped.state_dict, strict=True)
    return mapped


def mapping_counts(name: str, *, class_cond: bool | None = None, feat_cond: bool = True,
                   ssl_dim: int = 2048) -> dict:
    """Copied / dropped / new counts of warm-starting an RCDM (`feat_cond`, width `ssl_dim`) from the
    named foundation, with both built on the meta device from the flags (no download)."""
    from .script_util import create_model_and_diffusion

    f = FOUNDATIONS[name]
    with torch.device("meta"):
        source = f.build(class_cond)
        target, _ = create_model_and_diffusion(**f.flags, feat_cond=feat_cond, ssl_dim=ssl_dim)
    mapped = warm_start_state_dict(target.state_dict(), source.state_dict())
    return {"copied": len(mapped.copied), "dropped": len(mapped.dropped), "new": len(mapped.new)}


# `--train_only cond`: the parameters the representation acts through (its embedding, the null
# representation, the shared projection of the conditional norms) and those it modulates first: each
# residual block's embedding projection and its two norms.
TRAIN_ONLY_CHOICES = ("", "cond")
_COND_PATH = re.compile(r"^(ssl_emb|null_feat|shared)(\.|$)|\.emb_layers\.|\.(in_layers|out_layers)\.0\.")


def is_conditioning_parameter(name: str) -> bool:
    """Whether the parameter `name` is on the representation's path (see `_COND_PATH`)."""
    return bool(_COND_PATH.search(name))
