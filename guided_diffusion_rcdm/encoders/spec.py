"""The frozen encoder, described once, and the one loop that runs it over images.

`EncoderSpec` says which encoder gives the representations: its name (a published encoder, a
torchvision model, a local file, or a library's model: `timm:NAME`, `hf:REPO_OR_DIR`,
`open_clip:ARCH[:TAG_OR_FILE]`, `py:package.module:factory`, see `adapters`), its weights file
and revision, trunk or projector head, the input scaling and resolution it is
fed, whether it has its trained weights, and the width of what it returns. Its `to_dict()` is what
checkpoints (`meta["encoder"]`), feature caches and sample files record; `from_dict()` reads those
records, old ones included; `from_flags()` reads the command line's flags; `build()` gives the frozen
encoder (`get_ssl_models.get_model`, or `adapters.build_library_encoder` for a library's model).

`encode_images(encoder, images, ...)` is the one batched encode: file paths, PIL images, image
tensors in [-1, 1] or uint8 arrays in, B x D float32 representations out, computed in eval mode
without gradients under the chosen precision. Files that cannot be decoded are skipped with one
line naming each, and returned, so callers keep their rows aligned. `encode_views` is its core for
batches already cropped and scaled (the training loader's).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from .. import hub, logger
from ..errors import MissingInputError, UsageError, UserError
from . import adapters
from . import vits as vit_encoders
from .resnets import (FrozenEncoder, get_model, head_problem, native_input_normalize, native_input_size,
                      native_pooling, representation_dim)
from ..image_datasets import (
    arr_to_tensor,
    center_crop_arr,
    load_rgb_image,
    loader_worker_init,
    normalize_for_encoder,
    parse_normalization,
    to_rgb,
)
from ..precision import autocast, resolve_precision

# Named input scalings; a library's own mean/std is recorded as `mean=R,G,B;std=R,G,B`
# (`image_datasets.normalization_name`).
INPUT_NORMALIZATIONS = ("minus_one_one", "imagenet")
# "": the architecture's one way (global average pool for CNNs); "cls" and "mean_patch" are the
# choices a Vision Transformer offers (its class token, or the mean of its patch tokens).
POOLINGS = ("", *vit_encoders.POOLINGS)

# Field -> key of the record (`to_dict`), as checkpoints and feature caches have always named them.
RECORD_KEYS = {
    "name": "type_model",
    "use_head": "use_head",
    "input_normalize": "normalize",
    "input_size": "input_size",
    "pretrained": "pretrained",
    "pooling": "pooling",
    "weights": "weights",
    "weights_sha256": "weights_sha256",
    "revision": "revision",
    "width": "width",
}
# Keys a record may hold that are not fields: derived from the name, written for the reader.
DERIVED_KEYS = ("source",)
# Field -> command-line flag (`from_flags`, `given_fields`). Flags a parser does not declare are
# taken as not given.
FLAGS = {
    "name": "type_model",
    "use_head": "use_head",
    "input_normalize": "encoder_normalize",
    "input_size": "encoder_input_size",
    "pretrained": "pretrained_encoder",
    "pooling": "encoder_pooling",
    "weights": "encoder_weights",
}
# Field -> scalar saved in a sample file (.npz) by the sampling scripts.
SAMPLE_FILE_KEYS = {
    "name": "type_model",
    "use_head": "use_head",
    "input_normalize": "encoder_normalize",
    "input_size": "encoder_input_size",
    "pretrained": "encoder_pretrained",
    "pooling": "encoder_pooling",
    "weights": "encoder_weights",
    "weights_sha256": "encoder_weights_sha256",
    "revision": "encoder_revision",
}


@dataclass(frozen=True)
class EncoderSpec:
    """Which frozen encoder gives the representations, and how it is fed.

    :param name: a published encoder (dino, simclr, barlow, vicreg, supervised), a Vision
        Transformer (`vit_encoders.VIT_ENCODERS`), a torchvision classification model name, the path
        of a local checkpoint file (layout detected), or a library's model: `timm:NAME`,
        `hf:REPO_OR_DIR`, `open_clip:ARCH[:TAG_OR_FILE]`, `py:package.module:factory` (`adapters`).
    :param use_head: the projector head's output instead of the trunk's (where the method has one).
    :param input_normalize: "minus_one_one" (`x / 127.5 - 1`), "imagenet" (mean/std) or
        "mean=R,G,B;std=R,G,B"; "" (the default) becomes the encoder's own
        (`get_ssl_models.native_input_normalize`, or the library's preprocessing).
    :param input_size: side of the square centre crop the encoder sees; 0 (the default) becomes the
        encoder's own (224 for every ResNet; the library's for a library's model).
    :param pretrained: the published (or the local file's) weights; False: a fixed-seed random init,
        no download.
    :param pooling: which of the trunk's outputs is the representation: "cls" (the default for the
        Vision Transformers) or "mean_patch"; "" for architectures that pool one way (ResNets) and,
        for a library's model, its own pooled output.
    :param weights: a local weights file for a `timm:` or `open_clip:` model (`--encoder_weights`).
    :param weights_sha256: the SHA-256 of the weights file (`weights`, the open_clip file, or the
        `hf:` folder's), filled by `build`; a rebuild refuses a file that no longer has it.
    :param revision: the Hugging Face snapshot (commit) of an `hf:` repo id; `build` records it.
    :param width: the representation's size, once known (`build` measures it); not part of the
        encoder's identity, so two specs that differ only in it are equal.
    """

    name: str = "dino"
    use_head: bool = False
    input_normalize: str = ""
    input_size: int = 0
    pretrained: bool = True
    pooling: str = ""
    weights: str = ""
    weights_sha256: str = field(default="", compare=False)
    revision: str = ""
    width: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        name = str(self.name)
        if not name:
            raise UsageError("`type_model` is empty: name an encoder (e.g. dino) or a checkpoint file")
        set_ = object.__setattr__  # frozen: fill the native choices once, here
        name = adapters.canonical_name(name)
        set_(self, "name", name)
        set_(self, "use_head", bool(self.use_head))
        set_(self, "pretrained", bool(self.pretrained))
        weights = str(self.weights or "")
        set_(self, "weights", os.path.abspath(os.path.expanduser(weights)) if weights else "")
        set_(self, "weights_sha256", str(self.weights_sha256 or ""))
        set_(self, "revision", str(self.revision or ""))
        if self.source:
            if self.use_head:
                raise UsageError(f"`use_head`: {name} gives the library's own representation; leave `use_head` out")
            if self.weights and not os.path.isfile(self.weights):
                raise MissingInputError(f"`weights` {weights}: no such file")
            if not (self.input_normalize and self.input_size):
                native = adapters.native_preprocess(name, self.weights, self.revision, self.pretrained)
                set_(self, "input_normalize", str(self.input_normalize or native.normalize))
                set_(self, "input_size", int(self.input_size or native.input_size))
        elif self.weights or self.revision:
            raise UsageError(f"`weights`: {name} takes no separate weights file (only timm: and "
                             "open_clip: models do); name the checkpoint file with `type_model`")
        set_(self, "pooling", str(self.pooling or native_pooling(name)))
        set_(self, "input_normalize", str(self.input_normalize or native_input_normalize(name)))
        set_(self, "input_size", int(self.input_size or native_input_size(name)))
        if self.width is not None:
            set_(self, "width", int(self.width))
        if self.use_head and head_problem(name):
            raise UsageError(head_problem(name))
        try:
            parse_normalization(self.input_normalize)
        except UsageError:
            raise UsageError(f"`input_normalize` {self.input_normalize!r}: choose one of "
                             f"{', '.join(INPUT_NORMALIZATIONS)} or mean=R,G,B;std=R,G,B") from None
        if self.input_size < 1:
            raise UsageError(f"`input_size` {self.input_size}: must be a positive number of pixels")
        if self.pooling not in POOLINGS:
            raise UsageError(f"`pooling` {self.pooling!r}: choose one of "
                             f"{', '.join(p for p in POOLINGS if p)} (or leave it out)")

    @property
    def source(self) -> str:
        """The library the encoder comes from: timm, hf, open_clip, py; "" for the project's own
        (published encoders, Vision Transformers, torchvision models, local files)."""
        return adapters.source_of(self.name)

    # ------------------------------------------------------------------ records

    def to_dict(self) -> dict[str, Any]:
        """The record checkpoints, feature caches and reports keep (`RECORD_KEYS`); `width` only
        when known."""
        record = {RECORD_KEYS[f.name]: getattr(self, f.name) for f in fields(self)}
        if record["width"] is None:
            del record["width"]
        for key in ("weights", "weights_sha256", "revision"):  # the project's encoders have none
            if not record[key]:
                del record[key]
        if self.source:
            record["source"] = self.source
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> EncoderSpec:
        """The spec a record describes. Fields a record lacks (older records hold only some of
        type_model, use_head, normalize, pretrained) take their defaults: trained weights, and the
        encoder's own input scaling and size, which is what made them."""
        return cls(**record_fields(record))

    @classmethod
    def from_flags(cls, args: Any) -> EncoderSpec:
        """The spec the flags name (`FLAGS`; an argparse namespace or a mapping of flag -> value).
        An unset flag (absent or None) takes the default."""
        get = args.get if isinstance(args, Mapping) else (lambda k, d=None: getattr(args, k, d))
        given = {f: get(flag) for f, flag in FLAGS.items()}
        return cls(**{f: v for f, v in given.items() if v is not None})

    @classmethod
    def resolve(cls, given: Mapping[str, Any] | None = None,
                recorded: Mapping[str, Any] | None = None) -> EncoderSpec:
        """Each field from `given` (field -> value, None: not given), else from the `recorded`
        record, else its default.

        Naming another encoder than the record's discards the whole record: trunk or head, weights,
        input scaling and width belong to the encoder it describes.
        """
        chosen = {k: v for k, v in (given or {}).items() if v is not None}
        unknown = set(chosen) - set(FLAGS)
        if unknown:
            raise TypeError(f"not encoder fields: {', '.join(sorted(unknown))}")
        kept = record_fields(recorded or {})
        if "name" in chosen and kept.get("name") not in (None, chosen["name"]):
            kept = {}
        if any(kept.get(k) != v for k, v in chosen.items()):
            kept.pop("width", None)  # measured on the recorded encoder, not this one
        return cls(**{**kept, **chosen})

    def with_width(self, width: int) -> EncoderSpec:
        return replace(self, width=int(width))

    # ------------------------------------------------------------------ use

    def build(self, device: torch.device | str | None = None) -> nn.Module:
        """The frozen encoder (eval mode, no parameter takes gradients) on `device` (default CPU).

        It carries `input_normalize`, `input_size` and `spec` (this spec with `width` measured), so
        `encode_images(encoder, ...)` feeds it as described.
        """
        spec = self
        if self.source:
            module, ident = adapters.build_library_encoder(
                self.name, pretrained=self.pretrained, weights=self.weights, revision=self.revision,
                pooling=self.pooling)
            encoder = FrozenEncoder(module, input_normalize=self.input_normalize, input_size=self.input_size)
            spec = replace(spec, revision=ident.get("revision") or self.revision,
                           weights_sha256=self._checked_digest(ident.get("weights_file", "")))
        else:
            encoder = get_model(self.name, self.use_head, pretrained=self.pretrained, pooling=self.pooling,
                                input_size=self.input_size)
        encoder = encoder.to(device or "cpu").eval().requires_grad_(False)
        encoder.input_normalize = self.input_normalize
        encoder.input_size = self.input_size
        try:
            width = representation_dim(encoder)
        except ValueError as err:
            if not self.source:
                raise
            raise UsageError(f"`type_model` {self.name}: {err}") from None
        encoder.spec = spec.with_width(width)
        return encoder

    def _checked_digest(self, path: str) -> str:
        """The SHA-256 of the weights file `path` ('' for none); a one-line error when the spec
        records another (the file changed since the checkpoint or cache was made)."""
        if not path:
            return ""
        digest = hub.file_sha256(path)
        if self.weights_sha256 and digest != self.weights_sha256:
            raise UsageError(f"`type_model` {self.name}: the weights file {path} has SHA-256 {digest[:12]}..., "
                             f"not the recorded {self.weights_sha256[:12]}...: it changed since the checkpoint "
                             "or cache was made; put the original file back")
        return digest

    def describe(self) -> str:
        """One phrase for logs, e.g. `dino (trunk, trained weights, input minus_one_one 224x224)`."""
        part = "head" if self.use_head else "trunk"
        if self.pooling:
            part += f", {self.pooling}"
        weights = "trained weights" if self.pretrained else "UNTRAINED fixed-seed weights"
        if self.weights:
            weights = f"weights {self.weights}"
        width = f", {self.width}-d" if self.width else ""
        return (f"{self.name} ({part}{width}, {weights}, input {self.input_normalize} "
                f"{self.input_size}x{self.input_size})")

    def sample_file_fields(self) -> dict[str, Any]:
        """The scalars a sample file (.npz) saves about its encoder (`SAMPLE_FILE_KEYS`)."""
        return {key: getattr(self, f) for f, key in SAMPLE_FILE_KEYS.items()}


def record_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    """Field -> value for what a record (`to_dict`'s keys) holds; None values count as absent."""
    by_key = {key: f for f, key in RECORD_KEYS.items()}
    record = {k: v for k, v in record.items() if k not in DERIVED_KEYS}
    unknown = [k for k in record if k not in by_key]
    if unknown:
        raise UsageError(f"the encoder record {dict(record)} has unknown field(s) {unknown}: it was "
                         "written by a newer version, or is not an encoder record")
    return {by_key[k]: v for k, v in record.items() if v is not None}


def sample_file_record(fields_: Mapping[str, Any]) -> dict[str, Any]:
    """The encoder record in a sample file's scalars (`SAMPLE_FILE_KEYS`), as far as it goes."""
    out = {}
    for f, key in SAMPLE_FILE_KEYS.items():
        if key in fields_:
            value = fields_[key]
            out[RECORD_KEYS[f]] = value.item() if isinstance(value, np.ndarray) else value
    return out


def given_fields(values: Mapping[str, Any] | Any, given: Sequence[str] | frozenset[str] | None = None) -> dict[str, Any]:
    """Field -> value for the encoder flags (`FLAGS`) the command line gave: those in `given`
    (flag names), or every one that is set (not None) when `given` is None."""
    get = values.get if isinstance(values, Mapping) else (lambda k, d=None: getattr(values, k, d))
    return {f: get(flag) for f, flag in FLAGS.items() if (given is None or flag in given)}


# ----------------------------------------------------------------------------- encoding


class Encoded(NamedTuple):
    """What `encode_images` returns.

    `features`: K x D float32 (K x 2 x D with `mirrored`: plain, then horizontally flipped), one row
    per readable input, in input order; `kept`: the K input indices they belong to; `skipped`:
    input index -> why it could not be read.
    """

    features: torch.Tensor
    kept: list[int]
    skipped: dict[int, str]


class UnreadableImageError(UserError, OSError):
    """An input image that cannot be decoded, where every image is needed."""


ImageItem = str | Path | Image.Image
Images = ImageItem | Sequence[ImageItem] | torch.Tensor | np.ndarray


@torch.no_grad()
def encode_views(encoder: nn.Module, views: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Representations (B x D float32) of encoder views (B x 3 x S x S, already cropped and scaled
    as the encoder takes them), without gradients, under `precision` (fp32 default: exact; `auto`:
    see `precision.resolve_precision`)."""
    precision = resolve_precision(precision, device=views.device)
    with autocast(precision, views.device):
        return encoder(views).float()


class _FileViews(torch.utils.data.Dataset):
    """Decoded, centre-cropped views in [-1, 1] of paths / PIL images; an unreadable file gives its
    reason instead, so one bad file never stops a batch."""

    def __init__(self, items: Sequence[ImageItem], size: int, normalize: str):
        self.items, self.size, self.normalize = items, size, normalize

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            image = to_rgb(item) if isinstance(item, Image.Image) else load_rgb_image(item)
        except Exception as exc:  # the decoder's error, whatever its type: the file is skipped
            return i, None, f"{type(exc).__name__}: {exc}"
        view = arr_to_tensor(center_crop_arr(image, self.size))
        return i, normalize_for_encoder(view, self.normalize), None


def _collate(items):
    good = [(i, v) for i, v, _ in items if v is not None]
    views = torch.stack([v for _, v in good]) if good else None
    return [i for i, _ in good], views, [(i, r) for i, _, r in items if r is not None]


def _tensor_batches(images: torch.Tensor | np.ndarray, size: int, normalize: str, batch_size: int,
                    device: torch.device):
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:  # B x H x W x 3, as sample files store images
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"uint8 images must be B x H x W x 3, got shape {list(x.shape)}")
        x = x.permute(0, 3, 1, 2)
    else:
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be B x 3 x H x W in [-1, 1], got shape {list(x.shape)}")
    for start in range(0, x.shape[0], batch_size):
        batch = x[start : start + batch_size].to(device)
        batch = batch.float() / 127.5 - 1.0 if batch.dtype == torch.uint8 else batch.float()
        if batch.shape[-2:] != (size, size):  # the encoder was trained on size x size crops
            batch = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        yield list(range(start, start + batch.shape[0])), normalize_for_encoder(batch, normalize), []


def _describe_item(item: Any) -> str:
    return str(item) if isinstance(item, (str, Path)) else f"image {type(item).__name__}"


@torch.no_grad()
def encode_images(
    encoder: nn.Module,
    images: Images,
    *,
    batch_size: int = 32,
    precision: str = "fp32",
    device: torch.device | str | None = None,
    out_device: torch.device | str = "cpu",
    input_normalize: str | None = None,
    input_size: int | None = None,
    mirrored: bool = False,
    skip_unreadable: bool = True,
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "encoding images",
    warn: Callable[[str], None] | None = None,
) -> Encoded:
    """Representations of images, `batch_size` at a time (see `Encoded`).

    :param images: a path or PIL image, a list of those (decoded, centre-cropped to `input_size`),
        a float tensor 3 x H x W / B x 3 x H x W in [-1, 1] or uint8 B x H x W x 3 (resized to
        `input_size` when another size, bilinear antialiased). Either way scaled with
        `input_normalize` before the encoder sees it.
    :param input_normalize, input_size: default: the encoder's own (`EncoderSpec.build` sets them),
        else minus_one_one and 224.
    :param precision: the encoder's compute precision (fp32 default: exact; bf16, fp16, auto).
    :param device: where the encoder runs (default: its parameters' device); `out_device` where
        the features are returned (default: the CPU, so a whole dataset fits).
    :param mirrored: also encode each view flipped horizontally (features K x 2 x D).
    :param skip_unreadable: skip undecodable files with one line each (`warn`, default the run's
        log else stderr); False: raise `UnreadableImageError` naming the first.
    :param num_workers: decoding processes for paths (0: in this process).
    """
    normalize = input_normalize or getattr(encoder, "input_normalize", "minus_one_one")
    size = int(input_size or getattr(encoder, "input_size", 224))
    if device is None:
        first = next(encoder.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    warn = warn or logger.console
    is_array = isinstance(images, (torch.Tensor, np.ndarray))
    items = None if is_array else ([images] if isinstance(images, (str, Path, Image.Image)) else list(images))
    if is_array:
        batches = _tensor_batches(images, size, normalize, batch_size, device)
        total = -(-len(images) // batch_size)
    else:
        loader = torch.utils.data.DataLoader(
            _FileViews(items, size, normalize), batch_size=batch_size, num_workers=num_workers,
            collate_fn=_collate, pin_memory=device.type == "cuda", worker_init_fn=loader_worker_init,
            generator=torch.Generator(),  # its seed draw must not move the global RNG (sampling noise)
        )
        batches, total = loader, len(loader)
    if progress:
        batches = tqdm(batches, desc=desc, unit="batch", total=total)
    was_training = encoder.training
    encoder.eval()
    # One buffer for all rows, filled in place: the features are never held twice.
    features, kept, skipped = None, [], {}
    try:
        for idx, views, failed in batches:
            for i, reason in failed:
                if not skip_unreadable:
                    raise UnreadableImageError(f"{_describe_item(items[i])}: cannot be read as an image ({reason})")
                skipped[i] = reason
                warn(f"skipping unreadable image {_describe_item(items[i])} ({reason})")
            if views is None:
                continue
            views = views.to(device, non_blocking=True)
            if mirrored:
                out = encode_views(encoder, torch.cat([views, views.flip(-1)]), precision)
                out = torch.stack([out[: len(idx)], out[len(idx):]], dim=1)
            else:
                out = encode_views(encoder, views, precision)
            if features is None:
                count = (len(images) if images.ndim == 4 else 1) if is_array else len(items)
                features = torch.empty((count, *out.shape[1:]), dtype=out.dtype, device=out_device)
            features[len(kept) : len(kept) + len(idx)] = out
            kept.extend(idx)
    finally:
        encoder.train(was_training)
    if features is not None:
        if len(kept) < len(features):  # unreadable images: only then a copy of the rows kept
            features = features[: len(kept)].clone()
    else:
        width = getattr(getattr(encoder, "spec", None), "width", None) or 0
        features = torch.zeros((0, 2, width) if mirrored else (0, width), device=out_device)
    return Encoded(features, kept, skipped)


def check_paths_exist(images: Images) -> None:
    """FileNotFoundError naming the first local path in `images` that does not exist."""
    items = [images] if isinstance(images, (str, Path)) else images if isinstance(images, (list, tuple)) else []
    for item in items:
        if isinstance(item, (str, Path)) and "://" not in str(item) and not os.path.exists(item):
            raise MissingInputError(f"no such image file: {item}")
