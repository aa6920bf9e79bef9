"""Encoders from the field's libraries and from the user's own code, run with the library's own code.

One spelling for `--type_model` / `type_model=`, a source and a name:

- `timm:NAME`: `timm.create_model(NAME)`. Trained weights through timm's own mechanism (its Hugging
  Face hub cache), or a local file (`weights`, `--encoder_weights FILE`) that timm loads through
  `pretrained_cfg_overlay=dict(file=FILE)`. Preprocessing: `timm.data.resolve_data_config`.
  Representation: `forward_head(forward_features(x), pre_logits=True)`.
- `hf:REPO_OR_DIR`: a `transformers` vision model (`AutoModel`, `AutoImageProcessor`) from a folder
  written by `save_pretrained` or a repo id in the Hugging Face cache (`revision` kept: the
  snapshot's commit). Preprocessing: the image processor's mean/std and size. Representation:
  `pooler_output`, or the projected `image_embeds` / `get_image_features` for models with an
  image projection (CLIP, SigLIP).
- `open_clip:ARCH[:PRETRAINED_TAG_OR_FILE]`: the image tower of an OpenCLIP model
  (`open_clip.create_model_and_transforms`). Preprocessing: its transform's mean/std and size.
  Representation: `encode_image`.
- `py:package.module:factory`: `factory()` returns an `nn.Module` mapping B x 3 x S x S images to
  B x D features, or `(module, info)` with `info` a dict of `input_size` (default 224), `mean` and
  `std` (default ImageNet's).

`--encoder_pooling cls|mean_patch` takes the class token or the mean patch token of the last layer
instead, where the model has tokens (timm and `transformers` Vision Transformers). Each library is
imported only when its source is used; a missing one is one line naming the extra to install.
Errors in the user's input (a folder without a config, a model that takes no images, a factory that
fails, weights not on disk while offline) are `UserError`s: one line, exit status 2.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import MissingInputError, UsageError, UserError
from ..image_datasets import normalization_name

SOURCES = ("timm", "hf", "open_clip", "py")
# Source -> (module to import, pip extra that installs it)
LIBRARIES = {"timm": ("timm", None), "hf": ("transformers", "hf"), "open_clip": ("open_clip", "clip")}
DEFAULT_INPUT_SIZE = 224


class MissingPackageError(UserError, ImportError):
    """The library a source needs is not installed."""


class Preprocess(NamedTuple):
    """How the library feeds its model: the side of the square crop, and the input scaling
    (`image_datasets.normalization_name` of its mean/std)."""

    input_size: int
    normalize: str


def split_name(name: str) -> tuple[str, str]:
    """`("timm", "convnext_tiny")` for `timm:convnext_tiny`; `("", name)` for the other names
    (published encoders, torchvision models, local files)."""
    source, sep, rest = name.partition(":")
    return (source, rest) if sep and source in SOURCES else ("", name)


def source_of(name: str) -> str:
    return split_name(name)[0]


def _import(source: str):
    module, extra = LIBRARIES[source]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        install = f'pip install "guided-diffusion-rcdm[{extra}]"' if extra else f"pip install {module}"
        raise MissingPackageError(f"`type_model` {source}:...: needs the {module} package, which is not "
                                  f"installed ({err}): {install}") from None


def hf_offline() -> bool:
    """Whether the Hugging Face hub may not be reached (`HF_HUB_OFFLINE=1`)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def canonical_name(name: str) -> str:
    """The name with local paths made absolute (a checkpoint is read from anywhere)."""
    source, rest = split_name(name)
    if source == "hf" and os.path.isdir(os.path.expanduser(rest)):
        return f"hf:{os.path.abspath(os.path.expanduser(rest))}"
    if source == "open_clip":
        arch, sep, tag = rest.partition(":")
        if sep and os.path.isfile(os.path.expanduser(tag)):
            return f"open_clip:{arch}:{os.path.abspath(os.path.expanduser(tag))}"
    return name


# ----------------------------------------------------------------------------- timm


def _timm_create(name: str, pretrained: bool, weights: str) -> nn.Module:
    timm = _import("timm")
    if name not in timm.list_models(pretrained=False) and name not in timm.list_pretrained():
        raise UsageError(f"`type_model` timm:{name}: timm {timm.__version__} has no such model "
                         "(timm.list_models() lists them)")
    if weights:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=weights))
    if not pretrained:
        from .. import hub

        return hub.build_filled(lambda: timm.create_model(name, pretrained=False), None, f"timm:{name}")
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return timm.create_model(name, pretrained=True)
    except (LocalEntryNotFoundError, OSError, RuntimeError) as err:
        cfg = timm.models.get_pretrained_cfg(name)
        where = getattr(cfg, "hf_hub_id", None) or getattr(cfg, "url", None) or name
        raise MissingInputError(
            f"`type_model` timm:{name}: its trained weights are not on this machine ({type(err).__name__}): "
            f"fetch them into the Hugging Face cache {hf_cache_dir()} (e.g. `hf download {where}` where "
            "there is a network), or pass the file with `weights` FILE, or `pretrained` "
            "False for random weights") from None


class TimmEncoder(nn.Module):
    """A timm model's representation: its own pooled pre-logits, or the class / mean patch token
    of `forward_features`."""

    def __init__(self, model: nn.Module, pooling: str = ""):
        super().__init__()
        self.model, self.pooling = model, pooling
        if pooling:
            prefix = getattr(model, "num_prefix_tokens", None)
            if prefix is None:
                raise UsageError(f"`pooling` {pooling}: {type(model).__name__} has no tokens; leave "
                                 "`pooling` out (its own pooled features)")
            if pooling == "cls" and prefix < 1:
                raise UsageError(f"`pooling` cls: {type(model).__name__} has no class token; use "
                                 "mean_patch or leave it out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(x)
        if not self.pooling:
            return self.model.forward_head(features, pre_logits=True).flatten(1)
        if self.pooling == "cls":
            return features[:, 0]
        return features[:, self.model.num_prefix_tokens:].mean(1)


def _timm_preprocess(name: str) -> Preprocess:
    timm = _import("timm")
    from timm.data import resolve_data_config

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # timm's lookup of an unknown name: reported when the model is built
        cfg = None
    if cfg is None:
        with torch.device("meta"):
            model = _timm_create(name, False, "")
        config = resolve_data_config({}, model=model)
    else:
        config = resolve_data_config({}, pretrained_cfg=cfg.to_dict())
    return Preprocess(int(config["input_size"][-1]), normalization_name(config["mean"], config["std"]))


# ----------------------------------------------------------------------------- transformers


def _hf_location(name: str, revision: str) -> dict[str, Any]:
    """from_pretrained keyword arguments for a folder or a cached repo id."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UsageError(f"`type_model` hf:{name}: the folder has no config.json; save the model there with "
                             "model.save_pretrained(FOLDER) and its processor with processor.save_pretrained(FOLDER)")
        return dict(pretrained_model_name_or_path=path)
    if os.sep in name.strip("/").replace("/", "", 1) or name.startswith((".", "/", "~")):
        raise MissingInputError(f"`type_model` hf:{name}: no such folder")
    return dict(pretrained_model_name_or_path=name, revision=revision or None, local_files_only=hf_offline())


def _hf_missing(name: str, err: Exception) -> UserError:
    return MissingInputError(
        f"`type_model` hf:{name}: not in the Hugging Face cache {hf_cache_dir()} ({type(err).__name__}): fetch "
        f"it with `hf download {name}` where there is a network (or unset HF_HUB_OFFLINE), or save it with "
        "save_pretrained to a folder and pass hf:FOLDER")


def _hf_call(name: str, what: str, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except OSError as err:  # transformers' "not found" (cache, folder or hub) is an OSError
        if os.path.isdir(os.path.expanduser(name)):
            raise UsageError(f"`type_model` hf:{name}: {what}: {' '.join(str(err).split())[:300]}") from None
        raise _hf_missing(name, err) from None
    except ValueError as err:  # a config of no vision model / no image processor
        raise UsageError(f"`type_model` hf:{name}: {what}: {' '.join(str(err).split())[:300]}") from None


def _hf_preprocess(name: str, revision: str) -> Preprocess:
    transformers = _import("hf")
    where = _hf_location(name, revision)
    processor = _hf_call(name, "no image processor (save it with processor.save_pretrained(FOLDER))",
                         lambda: transformers.AutoImageProcessor.from_pretrained(**where))
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    if mean is None or std is None:
        raise UsageError(f"`type_model` hf:{name}: its processor {type(processor).__name__} is not an image "
                         "processor with a mean and std (not a vision model?)")
    size = None
    if getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None):
        size = processor.crop_size
    size = size or processor.size
    side = size if isinstance(size, int) else (size.get("height") or size.get("shortest_edge") or size.get("width"))
    return Preprocess(int(side or DEFAULT_INPUT_SIZE), normalization_name(mean, std))


class HFEncoder(nn.Module):
    """A `transformers` model's representation: `image_embeds` / `get_image_features` where it
    projects images, else `pooler_output`; or the class / mean patch token of the last layer."""

    def __init__(self, model: nn.Module, name: str, pooling: str = ""):
        super().__init__()
        self.model, self.pooling = model, pooling
        self.projects = hasattr(model, "get_image_features")
        if not self.projects and getattr(model, "main_input_name", "") != "pixel_values":
            raise UsageError(f"`type_model` hf:{name}: {type(model).__name__} is not a vision model (it takes "
                             f"{getattr(model, 'main_input_name', '?')}, not pixel_values)")
        config = getattr(model.config, "vision_config", model.config)
        self.patch = getattr(config, "patch_size", None)
        if pooling and not self.patch:
            raise UsageError(f"`pooling` {pooling}: {type(model).__name__} has no patch tokens; leave "
                             "`pooling` out (its pooled output)")

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        tower = getattr(self.model, "vision_model", self.model) if self.projects else self.model
        tokens = tower(pixel_values=x).last_hidden_state
        patch = self.patch if isinstance(self.patch, int) else self.patch[0]
        prefix = tokens.shape[1] - (x.shape[-2] // patch) * (x.shape[-1] // patch)
        if self.pooling == "cls":
            if prefix < 1:
                raise UsageError(f"`pooling` cls: {type(self.model).__name__} has no class token; use "
                                 "mean_patch or leave it out")
            return tokens[:, 0]
        return tokens[:, prefix:].mean(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pooling:
            return self._tokens(x)
        if self.projects:
            out = self.model.get_image_features(pixel_values=x)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        out = self.model(pixel_values=x)
        for key in ("image_embeds", "pooler_output"):
            value = getattr(out, key, None)
            if value is not None:
                return value.flatten(1)
        raise UsageError(f"{type(self.model).__name__} has no pooled output: pass `pooling` "
                         "mean_patch (or cls)")


def hf_model_class(transformers, config) -> Any:
    """The class the model was saved as when it is a base model or a projecting one
    (`CLIPVisionModelWithProjection`, `CLIPModel`, `Dinov2Model`, ...): `AutoModel` would drop an
    image projection. A task model (`...ForImageClassification`) gives way to `AutoModel`."""
    for arch in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, arch, None)
        if cls is not None and arch.endswith(("Model", "WithProjection")):
            return cls
    return transformers.AutoModel


def _hf_create(name: str, pretrained: bool, revision: str) -> tuple[nn.Module, str]:
    transformers = _import("hf")
    where = _hf_location(name, revision)
    config = _hf_call(name, "cannot read its config", lambda: transformers.AutoConfig.from_pretrained(**where))
    cls = hf_model_class(transformers, config)
    if cls is transformers.AutoModel:
        mapping = transformers.models.auto.modeling_auto.MODEL_MAPPING
        cls_ = mapping[type(config)] if type(config) in mapping else None
    else:
        cls_ = cls
    if cls_ is not None and not hasattr(cls_, "get_image_features") \
            and getattr(cls_, "main_input_name", "pixel_values") != "pixel_values":
        raise UsageError(f"`type_model` hf:{name}: {cls_.__name__} is not a vision model (it takes "
                         f"{cls_.main_input_name}, not pixel_values)")
    if pretrained:
        progress = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()  # the command's output stays its own lines
        try:
            model = _hf_call(name, "cannot load the model", lambda: cls.from_pretrained(**where))
        finally:
            if progress:
                transformers.utils.logging.enable_progress_bar()
    else:
        from .. import hub

        make = cls.from_config if cls is transformers.AutoModel else cls._from_config
        model = _hf_call(name, "no model for its config", lambda: hub.build_filled(lambda: make(config), None, name))
    return model.float(), str(getattr(model.config, "_commit_hash", None) or revision or "")


def hf_weights_file(name: str) -> str:
    """The weights file of a `save_pretrained` folder (hashed into the record), or ''."""
    path = os.path.expanduser(name)
    for file in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, file)):
            return os.path.join(path, file)
    return ""


# ----------------------------------------------------------------------------- OpenCLIP


def _open_clip_parts(rest: str, weights: str) -> tuple[str, str | None]:
    arch, _, tag = rest.partition(":")
    return arch, (weights or tag or None)


@functools.lru_cache(maxsize=2)
def _open_clip_model(rest: str, weights: str, pretrained: bool):
    open_clip = _import("open_clip")
    arch, tag = _open_clip_parts(rest, weights)
    if arch not in open_clip.list_models():
        raise UsageError(f"`type_model` open_clip:{arch}: OpenCLIP has no such architecture "
                         "(open_clip.list_models() lists them)")
    if pretrained and tag is None:
        raise UsageError(f"`type_model` open_clip:{arch} names no weights: add :TAG "
                         "(open_clip.list_pretrained_tags_by_model) or :FILE, or pass `pretrained` False "
                         "for random weights")
    if tag and not os.path.isfile(tag) and (os.sep in tag or tag.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        raise MissingInputError(f"`type_model` open_clip:{rest}: no such weights file {tag}")
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        from .. import hub

        extra = {}
        if not pretrained and tag and not os.path.isfile(tag):
            # no weights, but the tag's preprocessing (SigLIP's 0.5 mean/std, ...), from OpenCLIP's table
            cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
            extra = {f"image_{k}": cfg[k] for k in ("mean", "std") if k in cfg}
        return hub.build_filled(lambda: open_clip.create_model_and_transforms(
            arch, pretrained=tag if pretrained else None, **extra), None, arch)
    except (LocalEntryNotFoundError, OSError) as err:
        raise MissingInputError(
            f"`type_model` open_clip:{rest}: the weights are not on this machine ({type(err).__name__}): fetch "
            f"them into the Hugging Face cache {hf_cache_dir()} where there is a network, or pass a local file "
            f"as open_clip:{arch}:FILE") from None
    except RuntimeError as err:
        if "pretrained" in str(err).lower() or "tag" in str(err).lower():
            raise UsageError(f"`type_model` open_clip:{rest}: {' '.join(str(err).split())[:300]}") from None
        raise


def _open_clip_preprocess(rest: str, weights: str, pretrained: bool) -> Preprocess:
    _, _, preprocess = _open_clip_model(rest, weights, pretrained)
    from torchvision import transforms

    norm = next(t for t in preprocess.transforms if isinstance(t, transforms.Normalize))
    crop = next((t for t in preprocess.transforms if isinstance(t, transforms.CenterCrop)), None)
    size = crop.size[0] if crop is not None else DEFAULT_INPUT_SIZE
    return Preprocess(int(size), normalization_name(norm.mean, norm.std))


class OpenCLIPEncoder(nn.Module):
    """The image tower of an OpenCLIP model: `encode_image` (projected, not L2-normalised)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.visual = model.visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


# ----------------------------------------------------------------------------- the user's factory


@functools.lru_cache(maxsize=2)
def _call_factory(rest: str) -> tuple[nn.Module, Preprocess]:
    module_name, sep, attr = rest.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"`type_model` py:{rest}: spell it py:package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UsageError(f"`type_model` py:{rest}: cannot import {module_name} ({err}); put it on PYTHONPATH") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"`type_model` py:{rest}: {module_name} has no function {attr}")
    try:
        out = factory()
    except Exception as err:  # the user's code, whatever it raises: one line naming it
        raise UsageError(f"`type_model` py:{rest}: the factory raised {type(err).__name__}: {err}") from None
    model, info = out if isinstance(out, tuple) and len(out) == 2 else (out, {})
    if not isinstance(model, nn.Module) or not isinstance(info, dict):
        raise UsageError(f"`type_model` py:{rest}: the factory must return an nn.Module or (module, dict), "
                         f"not {type(out).__name__}")
    from ..image_datasets import IMAGENET_MEAN, IMAGENET_STD

    normalize = normalization_name(info.get("mean", IMAGENET_MEAN), info.get("std", IMAGENET_STD))
    return model, Preprocess(int(info.get("input_size", DEFAULT_INPUT_SIZE)), normalize)


# ----------------------------------------------------------------------------- entry points


@functools.lru_cache(maxsize=16)
def native_preprocess(name: str, weights: str = "", revision: str = "", pretrained: bool = True) -> Preprocess:
    """The input size and scaling the library feeds the model `name` (a `source:...` name)."""
    source, rest = split_name(name)
    if source == "timm":
        return _timm_preprocess(rest)
    if source == "hf":
        return _hf_preprocess(rest, revision)
    if source == "open_clip":
        return _open_clip_preprocess(rest, weights, pretrained)
    if source == "py":
        return _call_factory(rest)[1]
    raise ValueError(f"{name!r} is not a library encoder name")


def build_library_encoder(name: str, *, pretrained: bool, weights: str, revision: str,
                          pooling: str) -> tuple[nn.Module, dict[str, str]]:
    """The module giving B x D representations of B x 3 x S x S images scaled as the library does,
    and what identifies its weights: `revision` (HF commit) and/or `weights_file` (to hash)."""
    source, rest = split_name(name)
    if weights and source not in ("timm", "open_clip"):
        raise UsageError(f"`weights`: {source}: encoders take their weights from "
                         + ("the folder or repo" if source == "hf" else "the factory"))
    if weights and not os.path.isfile(weights):
        raise MissingInputError(f"`weights` {weights}: no such file")
    if pooling and source in ("open_clip", "py"):
        raise UsageError(f"`pooling` {pooling}: {source}: encoders give one representation "
                         "(leave `pooling` out)")
    ident: dict[str, str] = {}
    if source == "timm":
        module = TimmEncoder(_timm_create(rest, pretrained, weights), pooling)
        ident["weights_file"] = weights
    elif source == "hf":
        model, commit = _hf_create(rest, pretrained, revision)
        module = HFEncoder(model, rest, pooling)
        ident["revision"] = "" if os.path.isdir(os.path.expanduser(rest)) else commit
        ident["weights_file"] = hf_weights_file(rest) if pretrained else ""
    elif source == "open_clip":
        model, _, _ = _open_clip_model(rest, weights, pretrained)
        module = OpenCLIPEncoder(model)
        tag = _open_clip_parts(rest, weights)[1]
        ident["weights_file"] = tag if pretrained and tag and os.path.isfile(tag) else ""
    elif source == "py":
        module = _call_factory(rest)[0]
    else:
        raise ValueError(f"{name!r} is not a library encoder name")
    return module, ident
