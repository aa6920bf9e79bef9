"""The frozen encoders whose representations RCDM is conditioned on.

`get_model(name, use_head)` returns a torchvision ResNet-50 trunk (global-average-pooled, 2048-d)
trained with DINO, SimCLR, Barlow Twins, VICReg or supervised labels, optionally followed by the
method's projector head, read natively from the upstream files (VISSL model zoo, DINO and VICReg
training checkpoints, torchvision weights; see `tests/reference/ssl_checkpoint_layouts.json`). Any
torchvision classification model (its pooled features before the classifier) or a local checkpoint
file works too. Encoders come back in eval mode with every parameter frozen. They do NOT normalise
their input: feed 224x224 images as `image_datasets.encoder_input` makes them, with the scaling
`native_input_normalize(name)` names (the encoder's `input_normalize`): [-1, 1] (`x / 127.5 - 1`)
for the published encoders, as the original fed them, ImageNet mean/std for torchvision models.
The Vision Transformers of `vit_encoders` (DINO, DINOv2, MAE, MoCo v3, iBOT) come by their names
(`vit_encoders.VIT_ENCODERS`) or as local upstream files; they take ImageNet mean/std.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torchvision
from torch import nn

from .. import hub
from ..errors import MissingInputError, UsageError
from . import vits as vit_encoders

ENCODER_NAMES: tuple[str, ...] = ("dino", "simclr", "barlow", "vicreg", "supervised")
HEAD_DIMS = {"dino": 256, "simclr": 128, "barlow": 8192, "vicreg": 8192}
SSL_URLS = {
    "dino": "https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/"
    "dino_resnet50_pretrain_full_checkpoint.pth",
    "simclr": "https://dl.fbaipublicfiles.com/vissl/model_zoo/"
    "simclr_rn50_1000ep_simclr_8node_resnet_16_07_20.afe428c7/"
    "model_final_checkpoint_phase999.torch",
    "barlow": "https://dl.fbaipublicfiles.com/vissl/model_zoo/barlow_twins/"
    "barlow_twins_32gpus_4node_imagenet1k_1000ep_resnet50.torch",
    "vicreg": "https://dl.fbaipublicfiles.com/vicreg/resnet50_fullckpt.pth",
    # The original used resnet50(pretrained=True), i.e. these weights.
    "supervised": torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url,
}
# Published trunk-only files (no projector head; DINO's is 94 MB against its full checkpoint's
# ~12x more): read when the head is not asked for and no full checkpoint is at hand.
TRUNK_URLS = {
    "dino": "https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
}
DEFAULT_INPUT_SIZE = 224  # the crop every ResNet here was trained on
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".torch", ".ckpt", ".bin", ".safetensors")


class FrozenEncoder(nn.Module):
    """trunk -> (global average pool if spatial) -> optional head; always frozen, always eval.

    `train()` leaves it in eval mode, so calling `.train()` on a module that holds it can never
    update its BatchNorm statistics. `input_normalize` and `input_size` say how it is fed by
    default ("minus_one_one" for the published RCDM encoders, "imagenet" for torchvision's, see
    `native_input_normalize`; 224x224 crops); the module itself does not rescale anything.
    """

    def __init__(self, model: nn.Module, head: nn.Module | None = None, use_head: bool = False,
                 input_normalize: str = "minus_one_one", input_size: int = DEFAULT_INPUT_SIZE):
        super().__init__()
        if use_head and head is None:
            raise ValueError("use_head=True needs a head module")
        self.model = model
        self.head = head if use_head else None
        self.use_head = use_head
        self.input_normalize = input_normalize
        self.input_size = input_size
        freeze(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model(x)
        if x.ndim > 2:
            x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        if self.head is not None:
            x = self.head(x)
        return x

    def train(self, mode: bool = True) -> FrozenEncoder:
        return super().train(False)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and `requires_grad=False` on every parameter (the original set it on the module,
    which froze nothing)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


@torch.no_grad()
def representation_dim(encoder: nn.Module, device: torch.device | str | None = None) -> int:
    """The size of the encoder's output, measured with one forward of a zero image of its
    `input_size` (default 224)."""
    first = next(encoder.parameters(), None)
    if device is None:
        device = first.device if first is not None else "cpu"
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    size = int(getattr(encoder, "input_size", DEFAULT_INPUT_SIZE))
    out = encoder(torch.zeros(1, 3, size, size, device=device, dtype=dtype))
    if out.ndim != 2:
        raise ValueError(
            f"an encoder must return B x D features, this one returns {list(out.shape)}"
        )
    return int(out.shape[1])


# ----------------------------------------------------------------------------- architectures


def resnet50_trunk() -> nn.Module:
    trunk = torchvision.models.resnet50(weights=None)
    trunk.fc = nn.Identity()
    return trunk


class DINOHead(nn.Module):
    """DINO's projector up to its 256-d bottleneck (`head.mlp`); the 60000-way `last_layer` that
    follows it in training is never used for RCDM, so it is not built."""

    def __init__(self, in_dim: int = 2048, hidden_dim: int = 4096, bottleneck_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def simclr_head() -> nn.Module:
    return nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 128))


def barlow_head() -> nn.Module:
    # VISSL's layout: one Sequential per stage, so the keys read 0.0, 0.1, 1.0, 1.1, 2.0.
    def stage(i: int, o: int, last: bool = False) -> nn.Sequential:
        layers = [nn.Linear(i, o, bias=False)]
        return nn.Sequential(*layers if last else [*layers, nn.BatchNorm1d(o), nn.ReLU()])

    return nn.Sequential(stage(2048, 8192), stage(8192, 8192), stage(8192, 8192, last=True))


def vicreg_head() -> nn.Module:
    return nn.Sequential(
        nn.Linear(2048, 8192), nn.BatchNorm1d(8192), nn.ReLU(),
        nn.Linear(8192, 8192), nn.BatchNorm1d(8192), nn.ReLU(),
        nn.Linear(8192, 8192, bias=False),
    )


HEAD_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "dino": DINOHead, "simclr": simclr_head, "barlow": barlow_head, "vicreg": vicreg_head,
}


# ----------------------------------------------------------------------------- upstream layouts

StateDict = dict[str, torch.Tensor]


def _dig(obj, keys: list[str], what: str):
    for depth, key in enumerate(keys):
        if not isinstance(obj, Mapping) or key not in obj:
            found = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
            raise hub.CheckpointError(
                f"not a {what} checkpoint: expected {''.join(f'[{k!r}]' for k in keys)}, but "
                f"{''.join(f'[{k!r}]' for k in keys[:depth]) or 'the file'} holds {found}"
            )
        obj = obj[key]
    return obj


def _strip_prefixes(sd: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> StateDict:
    out = {}
    for key, value in sd.items():
        changed = True
        while changed:  # "module.backbone.x" and "backbone.module.x" both become "x"
            changed = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def _trunk_only(sd: StateDict) -> StateDict:
    # The trunk's classifier (fc) is replaced by Identity; a file may still carry it.
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def split_dino(obj) -> tuple[StateDict, StateDict]:
    """DINO full checkpoint -> teacher's trunk and `head.mlp` (module./backbone. prefixes)."""
    teacher = _dig(obj, ["teacher"], "DINO")
    if isinstance(teacher, Mapping) and "state_dict" in teacher:
        teacher = teacher["state_dict"]
    sd = _strip_prefixes(teacher, ("module.", "backbone."))
    trunk = _trunk_only({k: v for k, v in sd.items() if not k.startswith("head.")})
    # head.last_layer (weight-normed upstream: weight_g / weight_v) is not part of the encoder.
    head = {k[len("head."):]: v for k, v in sd.items() if k.startswith("head.mlp.")}
    return trunk, head


def _vissl_model(obj, what: str) -> tuple[StateDict, Mapping]:
    model = _dig(obj, ["classy_state_dict", "base_model", "model"], f"VISSL {what}")
    trunk = _dig(model, ["trunk"], f"VISSL {what}")
    trunk = _trunk_only({k.replace("_feature_blocks.", "", 1): v for k, v in trunk.items()})
    return trunk, model.get("heads", {})


def split_simclr(obj) -> tuple[StateDict, StateDict]:
    """VISSL SimCLR: heads `0.clf.0` (2048-2048) and `1.clf.0` (2048-128), a ReLU between."""
    trunk, heads = _vissl_model(obj, "SimCLR")
    rename = {"0.clf.0.": "0.", "1.clf.0.": "2."}
    head = {}
    for key, value in heads.items():
        for old, new in rename.items():
            if key.startswith(old):
                head[new + key[len(old):]] = value
                break
        else:
            head[key] = value  # left as is, so a strict load names it
    return trunk, head


def split_barlow(obj) -> tuple[StateDict, StateDict]:
    """VISSL Barlow Twins: heads `N.clf.M` -> `N.M`."""
    trunk, heads = _vissl_model(obj, "Barlow Twins")
    return trunk, {k.replace("clf.", "", 1): v for k, v in heads.items()}


def split_vicreg(obj) -> tuple[StateDict, StateDict]:
    """VICReg full checkpoint: `model` with backbone./module. prefixes and a `projector`."""
    sd = _strip_prefixes(_dig(obj, ["model"], "VICReg"), ("module.", "backbone."))
    trunk = _trunk_only(
        {k: v for k, v in sd.items() if not k.startswith(("projector.", "classifier."))}
    )
    head = {k[len("projector."):]: v for k, v in sd.items() if k.startswith("projector.")}
    return trunk, head


def split_supervised(obj) -> tuple[StateDict, StateDict]:
    """torchvision ResNet-50 weights: the trunk without `fc`."""
    sd = obj.get("state_dict", obj) if isinstance(obj, Mapping) else obj
    if not hub._is_state_dict(sd):
        raise hub.CheckpointError("not a torchvision ResNet-50 state dict")
    return _trunk_only(dict(sd)), {}


SPLITTERS: dict[str, Callable[[object], tuple[StateDict, StateDict]]] = {
    "dino": split_dino, "simclr": split_simclr, "barlow": split_barlow,
    "vicreg": split_vicreg, "supervised": split_supervised,
}


def split_trunk_file(obj) -> tuple[StateDict, StateDict]:
    """A published trunk-only file (`TRUNK_URLS`): the ResNet-50's state dict without `fc`."""
    sd = _strip_prefixes(obj, ("module.", "backbone.")) if hub._is_state_dict(obj) else None
    if sd is None or "conv1.weight" not in sd:
        raise hub.CheckpointError("not a ResNet-50 trunk state dict (conv1.weight, layer1.*, ...)")
    return _trunk_only(sd), {}


def _published_file(name: str, use_head: bool) -> tuple[str, Callable]:
    """(URL, splitter) of the file `get_model(name)` reads: the full checkpoint, or the trunk-only
    file (`TRUNK_URLS`) when the head is not needed and the full checkpoint is not at hand."""
    full = (SSL_URLS[name], SPLITTERS[name])
    if use_head or name not in TRUNK_URLS or hub.local_copy(SSL_URLS[name]) is not None:
        return full
    return TRUNK_URLS[name], split_trunk_file


def _published_check(name: str, split: Callable) -> Callable:
    """The `hub.download` check of a published encoder file: it splits into a trunk (and head)
    with exactly the keys and shapes of the ResNet-50 trunk (and `name`'s head), so that no other
    architecture (e.g. a ResNet-18 in DINO's layout) enters the cache under the published name."""
    def verify(path) -> None:
        trunk, head = split(hub.safe_torch_load(path, mmap=True))
        hub.expect_fit(resnet50_trunk, trunk, f"the {name} ResNet-50 trunk")
        if head and name in HEAD_BUILDERS:
            hub.expect_fit(HEAD_BUILDERS[name], head, f"the {name} head")
    return verify


def _download_published(name: str, use_head: bool) -> tuple[str, Callable]:
    """(local path, splitter) of `_published_file`'s file, downloaded if need be; a trunk-only
    file that cannot be fetched (a mirror without it) gives way to the full checkpoint."""
    url, split = _published_file(name, use_head)
    try:
        # the download must split into the expected trunk (and head) before it enters the cache
        return str(hub.download(url, verify=_published_check(name, split))), split
    except hub.ChecksumError:
        raise
    except hub.DownloadError as err:
        if url == SSL_URLS[name]:
            raise
        try:
            path = hub.download(SSL_URLS[name], verify=_published_check(name, SPLITTERS[name]))
        except hub.ChecksumError:
            raise
        except hub.DownloadError as full_err:
            raise hub.DownloadError(
                f"{err}\nThe full checkpoint (it holds the trunk too) could not be fetched either: "
                f"{str(full_err).splitlines()[0]}"
            ) from None
        return str(path), SPLITTERS[name]


def _published_encoder(name: str, use_head: bool, pretrained: bool, source: str | None = None,
                       obj=None) -> FrozenEncoder:
    if name == "supervised" and use_head:
        warnings.warn("the supervised encoder has no projector head: use_head is ignored "
                      "(as in the original)", stacklevel=3)
        use_head = False
    trunk_sd = head_sd = None
    if pretrained:
        split = SPLITTERS[name]
        if obj is None:
            source, split = _download_published(name, use_head)
            obj = hub.safe_torch_load(source)
        try:
            trunk_sd, head_sd = split(obj)
        except hub.CheckpointError as err:
            raise hub.CheckpointError(f"{source}: {err}") from None
        del obj  # drop optimizer state, student weights, ... before building the model
    trunk = hub.build_filled(resnet50_trunk, trunk_sd, f"{name} trunk from {source}")
    head = (hub.build_filled(HEAD_BUILDERS[name], head_sd, f"{name} head from {source}")
            if use_head else None)
    return FrozenEncoder(trunk, head, use_head)


# ----------------------------------------------------------------------------- torchvision models


def torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


# Arguments torchvision's builders set when they load weights (they change the architecture).
_TV_KWARGS = {
    "googlenet": {"transform_input": True, "aux_logits": True, "init_weights": False},
    "inception_v3": {"transform_input": True, "aux_logits": True, "init_weights": False},
}
_DENSENET_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _build_torchvision(name: str, weights=None) -> nn.Module:
    kwargs = dict(_TV_KWARGS.get(name, {})) if weights is not None else {}
    if weights is not None:
        kwargs["num_classes"] = len(weights.meta["categories"])
        if name.startswith("vit_") and "min_size" in weights.meta:
            kwargs["image_size"] = weights.meta["min_size"][0]
    return torchvision.models.get_model(name, weights=None, **kwargs)


def strip_classifier(model: nn.Module) -> nn.Module:
    """Replace the last Linear layer (the classifier) by Identity, so the model returns the pooled
    features it classifies; models without one (SqueezeNet) get their `classifier` replaced by a
    global average pool."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        model.set_submodule(linears[-1], nn.Identity())
    elif hasattr(model, "classifier"):
        model.classifier = nn.AdaptiveAvgPool2d(1)
    else:
        raise ValueError(f"cannot find the classifier of {type(model).__name__}")
    return model


def _torchvision_encoder(name: str, pretrained: bool) -> FrozenEncoder:
    if not pretrained:
        return FrozenEncoder(strip_classifier(hub.build_filled(lambda: _build_torchvision(name),
                                                           None, name)), input_normalize="imagenet")
    weights = torchvision.models.get_model_weights(name).DEFAULT
    path = _download_torchvision(name)
    sd = _torchvision_state_dict(name, hub.safe_torch_load(path))
    model = hub.build_filled(lambda: _build_torchvision(name, weights), sd, f"{name} from {path}")
    return FrozenEncoder(strip_classifier(model), input_normalize="imagenet")


def _torchvision_state_dict(name: str, sd) -> StateDict:
    if not hub._is_state_dict(sd):
        raise hub.CheckpointError(f"not a torchvision {name} state dict")
    if name.startswith("densenet"):
        sd = {(lambda m: m.group(1) + m.group(2) if m else k)(_DENSENET_LEGACY.match(k)): v
              for k, v in sd.items()}
    return dict(sd)


def _download_torchvision(name: str) -> Path:
    """torchvision's weights for `name` through the hub cache, checked to fit its architecture
    (keys and shapes) before they enter it."""
    weights = torchvision.models.get_model_weights(name).DEFAULT

    def verify(path) -> None:
        sd = _torchvision_state_dict(name, hub.safe_torch_load(path, mmap=True))
        hub.expect_fit(lambda: _build_torchvision(name, weights), sd, f"torchvision's {name}")

    return hub.download(weights.url, verify=verify)


# ----------------------------------------------------------------------------- local files


def _looks_like_path(model: str) -> bool:
    return os.path.exists(model) or os.sep in model or model.endswith(CHECKPOINT_SUFFIXES)


def detect_layout(obj) -> str | None:
    """Which upstream layout a loaded file has: one of ENCODER_NAMES, the name of the ViT encoder
    (`vit_encoders.VIT_ENCODERS`) whose architecture it holds, or None. A ViT layout of no known
    size is a one-line `hub.CheckpointError`."""
    if not isinstance(obj, Mapping):
        return None
    vit = vit_encoders.identify(obj)
    if vit is not None:
        return vit.name
    if "teacher" in obj:
        return "dino"
    if "classy_state_dict" in obj:
        try:
            heads = obj["classy_state_dict"]["base_model"]["model"].get("heads", {})
        except (KeyError, TypeError, AttributeError):
            return "simclr"
        return "barlow" if any(".clf.1." in k for k in heads) else "simclr"
    if isinstance(obj.get("model"), Mapping) and any("projector." in k for k in obj["model"]):
        return "vicreg"
    return None


def _torchvision_match(sd: StateDict) -> str | None:
    """The torchvision classification architecture whose state dict `sd` is, if any."""
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    names = torchvision_names()
    for name in sorted(names, key=lambda n: (not n.startswith("resnet"), n)):
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model = _build_torchvision(name)
            except Exception:  # a builder that cannot run on meta: not a candidate
                continue
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if want == shapes:
            return name
    return None


def _read_local(path: str) -> tuple[object, dict]:
    """A local encoder file as `(loaded object, meta)` (meta from the project's own format)."""
    if path.endswith(".safetensors"):
        return hub.load_checkpoint(path)
    obj = hub.safe_torch_load(path)
    if isinstance(obj, Mapping) and obj.get("format") == hub.CHECKPOINT_FORMAT:
        return obj["state_dict"], dict(obj.get("meta") or {})
    return obj, {}


def _local_encoder(path: str, use_head: bool, pooling: str = "",
                   input_size: int | None = None) -> FrozenEncoder:
    obj, meta = _read_local(path)
    try:
        layout = detect_layout(obj)
    except hub.CheckpointError as err:
        raise hub.CheckpointError(f"{path}: {err}") from None
    if layout in vit_encoders.VIT_ENCODERS:
        trunk, head = vit_encoders.load_vit(layout, obj, pooling=pooling or "cls", use_head=use_head,
                                            input_size=input_size or vit_encoders.INPUT_SIZE,
                                            source=path)
        return _vit_encoder(trunk, head, use_head)
    _no_pooling_choice(path, pooling)
    if layout is not None:
        return _published_encoder(layout, use_head, True, source=path, obj=obj)
    sd = obj.get("state_dict", obj) if isinstance(obj, Mapping) else obj
    if not hub._is_state_dict(sd):
        raise hub.CheckpointError(
            f"{path} is neither an upstream SSL checkpoint (DINO, VISSL, VICReg) nor a state dict"
        )
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    arch = meta.get("arch") or _torchvision_match(sd)
    if arch is None:
        raise hub.CheckpointError(
            f"{path}: cannot tell which architecture this state dict is for. Save it with "
            "guided_diffusion_rcdm.hub.save_checkpoint(path, sd, meta={'arch': '<torchvision "
            "model name>'}), or use a DINO / VISSL / VICReg checkpoint."
        )
    if use_head:
        warnings.warn(f"{path} has no projector head: use_head is ignored", stacklevel=3)
    model = hub.build_filled(lambda: _build_torchvision(arch), sd, f"{arch} from {path}")
    return FrozenEncoder(strip_classifier(model), input_normalize=meta.get("normalize", "imagenet"))


# ----------------------------------------------------------------------------- entry point

def native_input_normalize(model: str) -> str:
    """The input scaling the encoder `get_model(model)` is fed by default, without building it.

    "minus_one_one" ([-1, 1]) for the published encoders and upstream DINO / VISSL / VICReg files:
    the original fed them that, and the published RCDM checkpoints were trained on it (the
    supervised ResNet-50 included). "imagenet" (ImageNet mean/std) for torchvision models and
    torchvision state dicts, as their weights were trained, unless the file's meta records a
    `normalize`. A local file is read to tell. Unknown names give "minus_one_one" (`get_model`
    reports them).
    """
    key = model.lower()
    if key in ENCODER_NAMES:
        return "minus_one_one"
    if key in torchvision_names() or key in vit_encoders.VIT_ENCODERS:
        return "imagenet"
    if _looks_like_path(model) and os.path.isfile(model):
        layout, normalize = _local_layout(model, with_normalize=True)
        if layout in vit_encoders.VIT_ENCODERS:
            return vit_encoders.INPUT_NORMALIZE
        if layout is not None:
            return "minus_one_one"
        return normalize
    return "minus_one_one"


def _local_layout(path: str, with_normalize: bool = False):
    """`detect_layout` of a local file (and the `normalize` its meta records, "imagenet" if none),
    remembered while the file is unchanged: an EncoderSpec asks for several of its defaults."""
    st = os.stat(path)
    layout, normalize = _read_layout(os.path.abspath(path), st.st_size, st.st_mtime_ns)
    return (layout, normalize) if with_normalize else layout


@functools.lru_cache(maxsize=8)
def _read_layout(path: str, size: int, mtime_ns: int) -> tuple[str | None, str]:
    obj, meta = _read_local(path)
    return detect_layout(obj), str(meta.get("normalize", "imagenet"))


def weights_file(model: str) -> tuple[str, str] | None:
    """`(URL, name in the download cache)` of the trunk weights `get_model(model)` downloads; None
    for a local file or an unknown name."""
    key = model.lower()
    if key in ENCODER_NAMES:
        url = _published_file(key, use_head=False)[0]
    elif key in vit_encoders.VIT_ENCODERS:
        spec = vit_encoders.vit_spec(key)
        return spec.url, spec.file_name or os.path.basename(spec.url)
    elif key in torchvision_names():
        url = torchvision.models.get_model_weights(key).DEFAULT.url
    else:
        return None
    return url, os.path.basename(url)


def weights_on_disk(model: str) -> str | None:
    """The file `get_model(model)` (trunk) would read without the network, if there is one: in the
    download cache or a directory `RCDM_MIRROR`, or `model` itself when it is a local file."""
    key = model.lower()
    if key in vit_encoders.VIT_ENCODERS:
        path = vit_encoders.local_copy(vit_encoders.vit_spec(key))
        return str(path) if path else None
    source = weights_file(model)
    if source is None:
        return model if os.path.isfile(model) else None
    path = hub.local_copy(*source)
    return str(path) if path else None


def fetch_weights(model: str) -> str:
    """The file `get_model(model)` (trunk) reads, downloaded into the cache if need be (progress
    bar, checksum, layout checked before it is cached); `hub.DownloadError` when it cannot be."""
    key = model.lower()
    if key in vit_encoders.VIT_ENCODERS:
        return str(vit_encoders.download(vit_encoders.vit_spec(key)))
    if key in ENCODER_NAMES:
        return _download_published(key, use_head=False)[0]
    if weights_file(model) is None:
        raise UsageError(f"`type_model` {model}: not a published encoder or torchvision model")
    return str(_download_torchvision(key))


def native_input_size(model: str) -> int:
    """The side of the square crop the encoder `get_model(model)` is fed by default: 224 for the
    published ResNets, torchvision models and local files (their training crop) and
    `vit_encoders.INPUT_SIZE` for the Vision Transformers."""
    return vit_encoders.INPUT_SIZE if model.lower() in vit_encoders.VIT_ENCODERS else DEFAULT_INPUT_SIZE


def native_pooling(model: str) -> str:
    """The representation `get_model(model)` pools by default: "cls" for the Vision Transformers,
    named in `vit_encoders.VIT_ENCODERS` or local files in a ViT layout (read to tell); "" (the
    architecture's one way) otherwise."""
    if model.lower() in vit_encoders.VIT_ENCODERS:
        return "cls"
    if _looks_like_path(model) and os.path.isfile(model) and _local_layout(model) in vit_encoders.VIT_ENCODERS:
        return "cls"
    return ""


def head_problem(model: str) -> str | None:
    """Why `--use_head` cannot apply to the encoder named `model` (a Vision Transformer whose
    method publishes no projector head, or a torchvision classifier), without building or reading
    anything; None when it has a head or cannot tell by the name (a local file)."""
    key = model.lower()
    if key in vit_encoders.VIT_ENCODERS and not vit_encoders.VIT_ENCODERS[key].has_head:
        with_head = ", ".join(n for n, spec in vit_encoders.VIT_ENCODERS.items() if spec.has_head)
        return (f"`use_head`: {model} has no projector head (its method publishes none); leave `use_head` "
                f"out, or choose an encoder with one (dino, simclr, barlow, vicreg, {with_head})")
    if key not in ENCODER_NAMES and key in torchvision_names():
        return (f"`use_head`: {model} is a torchvision classifier, without a projector head; leave `use_head` "
                "out, or choose an encoder with one (dino, simclr, barlow, vicreg)")
    return None


def _vit_encoder(trunk: nn.Module, head: nn.Module | None, use_head: bool) -> FrozenEncoder:
    encoder = FrozenEncoder(trunk, head, use_head, input_normalize=vit_encoders.INPUT_NORMALIZE)
    encoder.input_size = trunk.vit.patch_embed.img_size[0]
    return encoder


def _no_pooling_choice(model: str, pooling: str) -> None:
    if pooling:
        raise UsageError(f"`pooling` {pooling!r}: {model} is not a Vision Transformer; its features "
                         "are pooled one way (leave `pooling` out)")


def get_model(model: str = "dino", use_head: bool = False, pretrained: bool = True, *,
              pooling: str = "", input_size: int | None = None) -> nn.Module:
    """A frozen encoder: input Bx3x224x224 (in [-1, 1] for the published ResNets), output BxD.

    `model`: one of ENCODER_NAMES; a ViT encoder name (`vit_encoders.VIT_ENCODERS`, e.g.
    dinov2_vits14); a torchvision classification model name (pooled features before its
    classifier; weights through `hub.download`, so `RCDM_MIRROR` applies); or the path of a local
    checkpoint (an upstream DINO / VISSL / VICReg / ViT file, or a torchvision state dict).
    `pretrained=False` builds the same architecture with a fixed-seed random init and no download.
    ViTs only: `pooling` "cls" (default) or "mean_patch" (see `vit_encoders.ViTTrunk`), and
    `input_size` (default 224, a multiple of the patch) the side of the crops they are fed.
    """
    key = model.lower()
    if key in vit_encoders.VIT_ENCODERS:
        trunk, head = vit_encoders.get_vit(key, pooling=pooling or "cls", use_head=use_head,
                                           pretrained=pretrained,
                                           input_size=input_size or vit_encoders.INPUT_SIZE)
        return _vit_encoder(trunk, head, use_head)
    if key in ENCODER_NAMES:
        _no_pooling_choice(model, pooling)
        return _published_encoder(key, use_head, pretrained)
    if key in torchvision_names():
        _no_pooling_choice(model, pooling)
        if use_head:
            warnings.warn(f"{model} has no projector head: use_head is ignored", stacklevel=2)
        return _torchvision_encoder(key, pretrained)
    if _looks_like_path(model):
        if not os.path.isfile(model):
            raise MissingInputError(f"`type_model` {model}: no such checkpoint file")
        return _local_encoder(model, use_head, pooling, input_size)
    raise UsageError(
        f"unknown `type_model` {model!r}. Use one of the published encoders "
        f"({', '.join(ENCODER_NAMES)}), a Vision Transformer ({', '.join(vit_encoders.VIT_ENCODERS)}), "
        f"a torchvision classification model ({', '.join(torchvision_names())}), or the path of a "
        "local checkpoint file."
    )
