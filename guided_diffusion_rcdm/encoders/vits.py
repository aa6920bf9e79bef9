"""Vision Transformer encoders (DINO, DINOv2, MAE, MoCo v3, iBOT), read from the authors' files.

The architectures are timm's `VisionTransformer`s (attention through
`F.scaled_dot_product_attention`); the weights are the published files in their upstream layouts,
mapped onto timm's names here:

- DINO: the plain backbone state dict (`cls_token`, `pos_embed`, `patch_embed.*`, `blocks.*`,
  `norm.*`) or a training checkpoint whose `teacher` holds `backbone.*` and the DINO head
  `head.mlp.*` (`module.` prefixes allowed; the 65536-way `head.last_layer` is not used).
- DINOv2: the backbone state dict with layer scale (`blocks.N.ls1.gamma`), a `mask_token` (dropped),
  `register_tokens` for the `_reg` models, SwiGLU (`mlp.w12`, `mlp.w3`) for ViT-g, and a position
  table for 518-pixel inputs; or a training `teacher` checkpoint (`backbone.*`, chunked blocks).
- MAE: `{"model": ...}` with the encoder (a decoder, `decoder_*` and `mask_token`, is dropped).
- MoCo v3: `{"state_dict": ...}` with `module.base_encoder.*` (its `head.*` is the 3-layer projector),
  `module.momentum_encoder.*` and `module.predictor.*` (both dropped); or the output of its
  `convert_to_deit.py`, `{"model": ...}` with the base encoder's backbone (no projector): MAE's
  layout, told apart by size (the ViT-S is MoCo v3's; the ViT-B of both is the same network).
- iBOT: `{"state_dict": ...}` with the teacher backbone (`checkpoint_teacher.pth`), or the full
  checkpoint whose `teacher` holds `backbone.*` and `head.*` (the head's `last_layer`, `last_layer2`
  are not used).

The representation is the CLS token after the final norm (`pooling="cls"`, the default), the mean of
the patch tokens after the final norm (`"mean_patch"`; register tokens excluded), or, with
`use_head=True`, the method's projector applied to the CLS token (DINO and iBOT: the head's MLP up
to its 256-d bottleneck; MoCo v3: the 256-d projector), as `--use_head` means for the ResNets.
Every encoder here sees 224x224 crops scaled with ImageNet mean/std; another `input_size` (a
multiple of the patch) resizes the position table the way the method's own code does at run time.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import hub
from ..errors import UsageError

POOLINGS = ("cls", "mean_patch")
INPUT_SIZE = 224
INPUT_NORMALIZE = "imagenet"  # ImageNet mean/std: how every method here fed its ViT
StateDict = dict[str, torch.Tensor]

_DINO = "https://dl.fbaipublicfiles.com/dino"
_DINOV2 = "https://dl.fbaipublicfiles.com/dinov2"
_MAE = "https://dl.fbaipublicfiles.com/mae/pretrain"
_MOCOV3 = "https://dl.fbaipublicfiles.com/moco-v3"
_IBOT = "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot"


@dataclass(frozen=True)
class ViTSpec:
    """One published ViT encoder: its upstream layout (`family`), timm architecture and files.

    `width`, `depth` and `patch` describe the architecture (they identify a local file's model);
    `url` is the published backbone file, `head_url` the file that also holds the projector head
    (None: the method publishes no head); `file_name` the name in the download cache where the
    URL's own name is shared by several models.
    """

    name: str
    family: str
    timm_arch: str
    width: int
    depth: int
    patch: int
    url: str
    head_url: str | None = None
    file_name: str | None = None
    head_file_name: str | None = None
    registers: int = 0
    timm_kwargs: Mapping = field(default_factory=dict)

    @property
    def has_head(self) -> bool:
        return self.head_url is not None

    @property
    def head_width(self) -> int | None:
        return HEAD_WIDTH.get(self.family) if self.has_head else None


def _dino(name: str, arch: str, width: int, folder: str, patch: int) -> ViTSpec:
    return ViTSpec(name, "dino", arch, width, 12, patch, f"{_DINO}/{folder}/{folder}.pth",
                   f"{_DINO}/{folder}/{folder}_full_checkpoint.pth")


def _dinov2(size: str, arch: str, width: int, depth: int, registers: int = 0) -> ViTSpec:
    stem = f"dinov2_vit{size}14"
    suffix = "_reg4" if registers else ""
    # init_values=1.0: the layer scale DINOv2's own builder starts from (timm's 1e-5 would make an
    # untrained network's representation nearly the same for every image).
    return ViTSpec(f"{stem}{'_reg' if registers else ''}", "dinov2", arch, width, depth, 14,
                   f"{_DINOV2}/{stem}/{stem}{suffix}_pretrain.pth", registers=registers,
                   timm_kwargs={"init_values": 1.0})


def _ibot(size: str, arch: str, width: int, depth: int) -> ViTSpec:
    folder = f"vit{size}_16"
    return ViTSpec(f"ibot_vit{size}16", "ibot", arch, width, depth, 16,
                   f"{_IBOT}/{folder}/checkpoint_teacher.pth", f"{_IBOT}/{folder}/checkpoint.pth",
                   file_name=f"ibot_{folder}_checkpoint_teacher.pth",
                   head_file_name=f"ibot_{folder}_checkpoint.pth")


VIT_ENCODERS: dict[str, ViTSpec] = {s.name: s for s in (
    _dino("dino_vits16", "vit_small_patch16_224", 384, "dino_deitsmall16_pretrain", 16),
    _dino("dino_vits8", "vit_small_patch8_224", 384, "dino_deitsmall8_pretrain", 8),
    _dino("dino_vitb16", "vit_base_patch16_224", 768, "dino_vitbase16_pretrain", 16),
    _dino("dino_vitb8", "vit_base_patch8_224", 768, "dino_vitbase8_pretrain", 8),
    _dinov2("s", "vit_small_patch14_dinov2", 384, 12),
    _dinov2("b", "vit_base_patch14_dinov2", 768, 12),
    _dinov2("l", "vit_large_patch14_dinov2", 1024, 24),
    _dinov2("g", "vit_giant_patch14_dinov2", 1536, 40),
    _dinov2("s", "vit_small_patch14_reg4_dinov2", 384, 12, registers=4),
    _dinov2("b", "vit_base_patch14_reg4_dinov2", 768, 12, registers=4),
    _dinov2("l", "vit_large_patch14_reg4_dinov2", 1024, 24, registers=4),
    _dinov2("g", "vit_giant_patch14_reg4_dinov2", 1536, 40, registers=4),
    ViTSpec("mae_vitb16", "mae", "vit_base_patch16_224", 768, 12, 16,
            f"{_MAE}/mae_pretrain_vit_base.pth"),
    ViTSpec("mae_vitl16", "mae", "vit_large_patch16_224", 1024, 24, 16,
            f"{_MAE}/mae_pretrain_vit_large.pth"),
    ViTSpec("mae_vith14", "mae", "vit_huge_patch14_224", 1280, 32, 14,
            f"{_MAE}/mae_pretrain_vit_huge.pth"),
    # MoCo v3's ViT-S has 12 heads of 32 channels (timm's ViT-S has 6).
    ViTSpec("mocov3_vits16", "mocov3", "vit_small_patch16_224", 384, 12, 16,
            f"{_MOCOV3}/vit-s-300ep/vit-s-300ep.pth.tar", f"{_MOCOV3}/vit-s-300ep/vit-s-300ep.pth.tar",
            timm_kwargs={"num_heads": 12}),
    ViTSpec("mocov3_vitb16", "mocov3", "vit_base_patch16_224", 768, 12, 16,
            f"{_MOCOV3}/vit-b-300ep/vit-b-300ep.pth.tar", f"{_MOCOV3}/vit-b-300ep/vit-b-300ep.pth.tar"),
    _ibot("s", "vit_small_patch16_224", 384, 12),
    _ibot("b", "vit_base_patch16_224", 768, 12),
    _ibot("l", "vit_large_patch16_224", 1024, 24),
)}

FAMILIES = ("dino", "dinov2", "mae", "mocov3", "ibot")
# The layouts a `{"model": <backbone>}` file may be: MAE's published encoders and the output of
# MoCo v3's convert_to_deit.py (for DeiT fine-tuning) hold the same keys; the size tells them apart.
DEIT_FAMILIES = ("mae", "mocov3")
FAMILY_NAMES = {"dino": "DINO", "dinov2": "DINOv2", "mae": "MAE", "mocov3": "MoCo v3", "ibot": "iBOT"}
HEAD_WIDTH = {"dino": 256, "ibot": 256, "mocov3": 256}

# How each method's code resizes its position table for another input size (the table itself is
# for 224 pixels, DINOv2's for 518): bicubic, with DINO's +0.1 scale-factor offset and with or
# without antialiasing. MoCo v3 never resizes; it gets MAE's rule (the same kind of fixed sin-cos
# table).
_RESIZE_RULE = {  # family (dinov2 with registers separately) -> (offset, antialias)
    "dino": (0.1, False), "ibot": (0.1, False), "dinov2": (0.1, False), "dinov2_reg": (0.0, True),
    "mae": (0.0, False), "mocov3": (0.0, False),
}


def vit_spec(name: str) -> ViTSpec:
    try:
        return VIT_ENCODERS[name.lower()]
    except KeyError:
        raise UsageError(f"unknown ViT encoder {name!r}; known: {', '.join(VIT_ENCODERS)}") from None


def published_files() -> dict[str, str | None]:
    """URL -> cache file name (None: the URL's own) of every published file these encoders use."""
    files = {}
    for spec in VIT_ENCODERS.values():
        files[spec.url] = spec.file_name
        if spec.head_url:
            files[spec.head_url] = spec.head_file_name
    return files


# ----------------------------------------------------------------------------- the modules


class ViTTrunk(nn.Module):
    """A timm ViT giving one vector per image: B x 3 x S x S -> B x width.

    `pooling="cls"`: the CLS token after the final norm; `"mean_patch"`: the mean of the patch
    tokens after the final norm (CLS and register tokens excluded).
    """

    def __init__(self, vit: nn.Module, pooling: str = "cls"):
        super().__init__()
        if pooling not in POOLINGS:
            raise UsageError(f"pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
        self.vit = vit
        self.pooling = pooling

    @property
    def width(self) -> int:
        return int(self.vit.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)
        if self.pooling == "cls":
            return tokens[:, 0]
        return tokens[:, self.vit.num_prefix_tokens:].mean(dim=1)


def dino_head(in_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256) -> nn.Module:
    """DINO's / iBOT's ViT head up to its bottleneck (`mlp.0`, `mlp.2`, `mlp.4`: Linear, GELU)."""
    return nn.Sequential(OrderedDict(mlp=nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
        nn.Linear(hidden_dim, bottleneck_dim),
    )))


def mocov3_projector(in_dim: int, mlp_dim: int = 4096, out_dim: int = 256) -> nn.Module:
    """MoCo v3's ViT projector: 3 bias-free Linear layers with BatchNorm (the last one without
    affine parameters), ReLU between."""
    return nn.Sequential(
        nn.Linear(in_dim, mlp_dim, bias=False), nn.BatchNorm1d(mlp_dim), nn.ReLU(),
        nn.Linear(mlp_dim, mlp_dim, bias=False), nn.BatchNorm1d(mlp_dim), nn.ReLU(),
        nn.Linear(mlp_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False),
    )


HEAD_BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "dino": dino_head, "ibot": dino_head, "mocov3": mocov3_projector,
}


def build_timm_vit(spec: ViTSpec, input_size: int = INPUT_SIZE) -> nn.Module:
    """timm's architecture for `spec` at `input_size` pixels, no classifier, fused attention on."""
    import timm  # imported here: it costs ~0.7 s, which every command not using a ViT would pay

    vit = timm.create_model(spec.timm_arch, pretrained=False, num_classes=0, global_pool="token",
                            img_size=input_size, **spec.timm_kwargs)
    use_fused_attention(vit)
    return vit


def use_fused_attention(module: nn.Module) -> int:
    """Route every timm attention layer through `F.scaled_dot_product_attention` (timm turns it off
    under TIMM_FUSED_ATTN=0); returns how many layers there are."""
    layers = [m for m in module.modules() if hasattr(m, "fused_attn")]
    for layer in layers:
        layer.fused_attn = True
    return len(layers)


# ----------------------------------------------------------------------------- upstream layouts


def _keys_of(obj) -> list[str]:
    return list(obj)[:6] if isinstance(obj, Mapping) else [type(obj).__name__]


def _layout_error(spec_or_family: ViTSpec | str, obj, expected: str) -> hub.CheckpointError:
    family = spec_or_family.family if isinstance(spec_or_family, ViTSpec) else spec_or_family
    return hub.CheckpointError(
        f"not a {FAMILY_NAMES[family]} ViT checkpoint: expected {expected}, found keys {_keys_of(obj)}"
    )


def _strip(sd: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> StateDict:
    out = {}
    for key, value in sd.items():
        for prefix in prefixes:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def _state_dict(obj) -> StateDict | None:
    return dict(obj) if hub._is_state_dict(obj) else None


def _split_head(sd: StateDict, dropped: tuple[str, ...]) -> tuple[StateDict, StateDict]:
    """`head.*` apart from the backbone; `dropped` prefixes (training-only parts) removed."""
    sd = {k: v for k, v in sd.items() if not k.startswith(dropped)}
    head = {k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")}
    trunk = {k: v for k, v in sd.items() if not k.startswith("head.")}
    return trunk, head


# Parts of the training checkpoints no encoder uses: the 65536-way last layers of the DINO / iBOT
# heads, iBOT's patch head and the student's mask embedding.
_DINO_DROPPED = ("head.last_layer", "head.mlp2.", "head.last_norm", "masked_embed")


def split_dino(obj) -> tuple[StateDict, StateDict]:
    """DINO (and iBOT) -> (backbone, head): a plain state dict, `{"state_dict": ...}` (iBOT's
    teacher file) or a training checkpoint's `teacher` (`module.`/`backbone.` prefixes)."""
    if isinstance(obj, Mapping) and "teacher" in obj:
        sd = _state_dict(obj["teacher"])
    elif isinstance(obj, Mapping) and "state_dict" in obj:
        sd = _state_dict(obj["state_dict"])
    else:
        sd = _state_dict(obj)
    if sd is None:
        raise _layout_error("dino", obj, "a state dict, {'state_dict': ...} or {'teacher': ...}")
    sd = _strip(sd, ("module.", "backbone."))
    if "cls_token" not in sd:
        raise _layout_error("dino", sd, "'cls_token' among the backbone's keys")
    return _split_head(sd, _DINO_DROPPED)


_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


def split_dinov2(obj) -> tuple[StateDict, StateDict]:
    """DINOv2 -> (backbone, {}): the published backbone state dict, or a training checkpoint's
    `teacher` (`backbone.*`; its `dino_head`/`ibot_head` are dropped; chunked blocks unchunked)."""
    sd = _state_dict(obj["teacher"]) if isinstance(obj, Mapping) and "teacher" in obj else _state_dict(obj)
    if sd is None:
        raise _layout_error("dinov2", obj, "a state dict or {'teacher': ...}")
    sd = {k: v for k, v in _strip(sd, ("module.", "backbone.")).items()
          if not k.startswith(("dino_head.", "ibot_head."))}
    if "mask_token" not in sd:
        raise _layout_error("dinov2", sd, "'mask_token' and 'blocks.N.ls1.gamma' among its keys")
    # Training checkpoints group blocks into chunks, `blocks.<chunk>.<block>.*` (block numbers
    # are global): one level as in the published files.
    sd = {_CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if k != "mask_token"}, {}


def split_mae(obj) -> tuple[StateDict, StateDict]:
    """MAE `{"model": ...}` -> (encoder, {}); a full pretraining file's decoder is dropped."""
    sd = _state_dict(obj.get("model")) if isinstance(obj, Mapping) else None
    if sd is None:
        raise _layout_error("mae", obj, "{'model': <state dict>}")
    sd = {k: v for k, v in sd.items() if not k.startswith("decoder_") and k != "mask_token"}
    if "cls_token" not in sd:
        raise _layout_error("mae", sd, "'cls_token' among the encoder's keys")
    return sd, {}


def split_mocov3(obj) -> tuple[StateDict, StateDict]:
    """MoCo v3 `{"state_dict": ...}` -> (base encoder, its projector `head.*`); the momentum
    encoder and the predictor are dropped. `convert_to_deit.py`'s output `{"model": ...}` ->
    (backbone, {}): it keeps no projector."""
    if isinstance(obj, Mapping) and "state_dict" not in obj and _state_dict(obj.get("model")) is not None:
        return split_mae(obj)
    sd = _state_dict(obj.get("state_dict")) if isinstance(obj, Mapping) else None
    if sd is None:
        raise _layout_error("mocov3", obj, "{'state_dict': <state dict>} or convert_to_deit.py's {'model': ...}")
    sd = _strip(sd, ("module.",))
    if "base_encoder.cls_token" not in sd:
        raise _layout_error("mocov3", sd, "'module.base_encoder.cls_token' among its keys")
    sd = {k.removeprefix("base_encoder."): v for k, v in sd.items()
          if not k.startswith(("momentum_encoder.", "predictor."))}
    return _split_head(sd, ())


SPLITTERS: dict[str, Callable[[object], tuple[StateDict, StateDict]]] = {
    "dino": split_dino, "ibot": split_dino, "dinov2": split_dinov2, "mae": split_mae,
    "mocov3": split_mocov3,
}


def detect_family(obj) -> str | None:
    """The upstream ViT layout of a loaded file (one of FAMILIES), or None if it is not a ViT."""
    if not isinstance(obj, Mapping):
        return None
    if "teacher" in obj and isinstance(obj["teacher"], Mapping):
        keys = _strip({k: None for k in obj["teacher"]}, ("module.", "backbone."))
        if "cls_token" not in keys:
            return None  # a ResNet training checkpoint
        if "mask_token" in keys:
            return "dinov2"
        return "ibot" if any(k.startswith(("head.last_layer2", "head.mlp2.")) for k in keys) else "dino"
    if isinstance(obj.get("state_dict"), Mapping):
        keys = _strip({k: None for k in obj["state_dict"]}, ("module.",))
        if "base_encoder.cls_token" in keys:
            return "mocov3"
        return "ibot" if "cls_token" in _strip(keys, ("backbone.",)) else None
    if isinstance(obj.get("model"), Mapping):
        return "mae" if "cls_token" in obj["model"] else None
    if "cls_token" in obj:
        return "dinov2" if "mask_token" in obj else "dino"
    return None


def identify(obj, source: str = "the file") -> ViTSpec | None:
    """The published encoder whose architecture a loaded upstream file holds (by its layout, width,
    depth, patch size and register tokens), None if it is no ViT layout; a ViT of another size is
    a one-line `CheckpointError`."""
    family = detect_family(obj)
    if family is None:
        return None
    families = (family,)
    if family == "mae" and not any(k.startswith("decoder_") for k in obj["model"]):
        families = DEIT_FAMILIES  # a backbone alone: MAE's file or MoCo v3's convert_to_deit.py output
    trunk, _ = SPLITTERS[family](obj)
    width = trunk["cls_token"].shape[-1]
    depth = len({k.split(".")[1] for k in trunk if k.startswith("blocks.")})
    patch = trunk["patch_embed.proj.weight"].shape[-1] if "patch_embed.proj.weight" in trunk else None
    registers = trunk["register_tokens"].shape[1] if "register_tokens" in trunk else 0
    for spec in VIT_ENCODERS.values():
        if spec.family in families and (spec.width, spec.depth, spec.patch, spec.registers) == (
                width, depth, patch, registers):
            return spec
    known = ", ".join(s.name for s in VIT_ENCODERS.values() if s.family in families)
    what = (f"a {FAMILY_NAMES[family]} ViT" if len(families) == 1 else
            "a ViT backbone in the {'model': ...} layout (MAE's files, MoCo v3's convert_to_deit.py output)")
    raise hub.CheckpointError(
        f"{source}: {what} of width {width}, {depth} blocks, patch {patch}"
        f"{f', {registers} registers' if registers else ''} is none of the known encoders ({known})"
    )


# ----------------------------------------------------------------------------- onto timm


def resize_position_grid(table: torch.Tensor, grid: int, offset: float = 0.0,
                         antialias: bool = False) -> torch.Tensor:
    """A 1 x (M*M) x D patch position table resized to 1 x (grid*grid) x D, bicubic.

    `offset` > 0 reproduces DINO's interpolation: scale factor (grid + offset) / M instead of the
    output size (which makes the sampling positions differ slightly); unchanged when M == grid.
    """
    n, dim = table.shape[1], table.shape[2]
    side = math.isqrt(n)
    if side * side != n:
        raise hub.CheckpointError(f"the position table has {n} patch positions, not a square grid")
    if side == grid:
        return table
    x = table.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    if offset:
        scale = (grid + offset) / side
        x = F.interpolate(x, scale_factor=(scale, scale), mode="bicubic", antialias=antialias)
    else:
        x = F.interpolate(x, size=(grid, grid), mode="bicubic", antialias=antialias)
    return x.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(table.dtype)


def to_timm(spec: ViTSpec, trunk: StateDict, input_size: int = INPUT_SIZE) -> StateDict:
    """An upstream backbone state dict (wrappers and prefixes removed) in timm's names, its
    position table resized for `input_size` the method's way (see `resize_position_grid`)."""
    sd = dict(trunk)
    if spec.family == "dinov2":
        sd = {k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2."): v
              for k, v in sd.items()}
    rule = "dinov2_reg" if spec.registers else spec.family
    offset, antialias = _RESIZE_RULE[rule]
    pos = sd.get("pos_embed")
    if pos is None or pos.ndim != 3:
        return sd  # the strict load names what is missing
    grid = input_size // spec.patch
    cls_pos, patch_pos = pos[:, :1], resize_position_grid(pos[:, 1:], grid, offset, antialias)
    if spec.registers and "register_tokens" in sd:
        # DINOv2 adds the CLS position before inserting the registers, which have none: timm
        # keeps the CLS position in the token and a table for the patches only.
        sd["reg_token"] = sd.pop("register_tokens")
        sd["cls_token"] = sd["cls_token"] + cls_pos
        sd["pos_embed"] = patch_pos
    else:
        sd["pos_embed"] = torch.cat([cls_pos, patch_pos], dim=1)
    return sd


def load_vit(spec: ViTSpec | str, obj=None, *, pooling: str = "cls", use_head: bool = False,
             input_size: int = INPUT_SIZE, source: str = "") -> tuple[ViTTrunk, nn.Module | None]:
    """(trunk, head or None) for `spec` from a loaded upstream file `obj` (None: fixed-seed
    random weights, no file). The head is built only with `use_head`."""
    spec = vit_spec(spec) if isinstance(spec, str) else spec
    if pooling not in POOLINGS:
        raise UsageError(f"`pooling` {pooling!r}: choose one of {', '.join(POOLINGS)}")
    if use_head and not spec.has_head:
        raise UsageError(f"`use_head`: {spec.name} has no projector head ({FAMILY_NAMES[spec.family]} "
                         "publishes none); leave it out (its CLS token) or use `pooling` mean_patch")
    if use_head and pooling != "cls":
        raise UsageError(f"`use_head` with `pooling` {pooling}: {spec.name}'s projector head reads "
                         "the CLS token; leave one of them out")
    if input_size % spec.patch:
        raise UsageError(f"`input_size` {input_size}: {spec.name} needs a multiple of its patch size "
                         f"{spec.patch} (e.g. {max(1, round(input_size / spec.patch)) * spec.patch})")
    where = f"{source}: " if source else ""
    trunk_sd = head_sd = None
    if obj is not None:
        try:
            trunk_sd, head_sd = SPLITTERS[spec.family](obj)
        except hub.CheckpointError as err:
            raise hub.CheckpointError(f"{where}{err}") from None
        trunk_sd = to_timm(spec, trunk_sd, input_size)
        if use_head and not head_sd:
            raise hub.CheckpointError(
                f"{where}holds no {FAMILY_NAMES[spec.family]} head (head.* keys): use the training "
                f"checkpoint {spec.head_url}"
            )
    vit = hub.build_filled(lambda: build_timm_vit(spec, input_size), trunk_sd, f"{where}{spec.name} backbone")
    head = None
    if use_head:
        head = hub.build_filled(lambda: HEAD_BUILDERS[spec.family](spec.width), head_sd,
                       f"{where}{spec.name} head")
    return ViTTrunk(vit, pooling), head


def published_file(spec: ViTSpec, use_head: bool = False) -> tuple[str, str | None, tuple[str, ...]]:
    """`(URL, cache name, other cache paths)` of the file `download(spec, use_head)` reads. Where the
    authors give several models' files one name (iBOT's `checkpoint_teacher.pth`), a copy under
    that name in a folder named after the model (`ibot_vits16/checkpoint_teacher.pth`) or after the
    URL's folder (`vits_16/checkpoint_teacher.pth`) in the download cache is used too."""
    url, name = (spec.head_url, spec.head_file_name) if use_head else (spec.url, spec.file_name)
    return url, name, (f"{spec.name}/{url.rsplit('/', 1)[1]}",)


def local_copy(spec: ViTSpec, use_head: bool = False):
    """The file `download(spec, use_head)` would read without the network, or None."""
    url, name, also = published_file(spec, use_head)
    return hub.local_copy(url, name, also)


def download(spec: ViTSpec, use_head: bool = False):
    """The published file for `spec` (the one with the head when `use_head`) through the hub cache
    (`RCDM_MIRROR`, checksums), checked before it is cached to hold the expected layout, with the
    keys and shapes of `spec`'s backbone (and head, when the file has one)."""
    url, name, also = published_file(spec, use_head)

    def verify(path) -> None:
        trunk, head = SPLITTERS[spec.family](hub.safe_torch_load(path, mmap=True))
        if use_head and not head:
            raise hub.CheckpointError(f"no {FAMILY_NAMES[spec.family]} head (head.* keys)")
        hub.expect_fit(lambda: build_timm_vit(spec, INPUT_SIZE), to_timm(spec, trunk, INPUT_SIZE),
                       f"the {spec.name} backbone")
        if head and spec.has_head:
            hub.expect_fit(lambda: HEAD_BUILDERS[spec.family](spec.width), head, f"the {spec.name} head")

    return hub.download(url, file_name=name, verify=verify, also=also)


def get_vit(name: str, *, pooling: str = "cls", use_head: bool = False, pretrained: bool = True,
            input_size: int = INPUT_SIZE) -> tuple[ViTTrunk, nn.Module | None]:
    """(trunk, head or None) of the published encoder `name` (a key of VIT_ENCODERS), its weights
    downloaded through the hub cache; `pretrained=False`: fixed-seed random weights, no download."""
    spec = vit_spec(name)
    if not pretrained:
        return load_vit(spec, None, pooling=pooling, use_head=use_head, input_size=input_size)
    path = download(spec, use_head)
    return load_vit(spec, hub.safe_torch_load(path), pooling=pooling, use_head=use_head,
                    input_size=input_size, source=str(path))
