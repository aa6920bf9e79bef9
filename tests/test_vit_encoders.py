"""ViT encoders: files in each upstream layout (random weights) load strictly, and give what timm's
model gives on the same weights and image; CLS / mean-patch / head widths; clear errors."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skdata
from timm.models.vision_transformer import checkpoint_filter_fn

from guided_diffusion_rcdm import get_ssl_models, hub
from guided_diffusion_rcdm import vit_encoders as vit
from guided_diffusion_rcdm.get_ssl_models import get_model, representation_dim
from guided_diffusion_rcdm.image_datasets import encoder_input
from helpers_hub import closed_port_url, random_tensor, serve_directory, sha256

TOL = 1e-5
DINOV2_FILE_SIZE = 518  # DINOv2's files hold a position table for 518-pixel inputs (37x37)


# ----------------------------------------------------------------------------- upstream files


def _shapes_of_timm(spec: vit.ViTSpec, size: int) -> dict[str, list[int]]:
    with torch.device("meta"):
        model = timm.create_model(spec.timm_arch, num_classes=0, img_size=size, **spec.timm_kwargs)
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def upstream_backbone_shapes(spec: vit.ViTSpec) -> dict[str, list[int]]:
    """The backbone's keys and shapes as the authors' code names them."""
    if spec.family != "dinov2":
        return _shapes_of_timm(spec, 224)  # DINO, MAE, MoCo v3 (timm 0.4), iBOT: timm's names
    shapes = {}
    for key, shape in _shapes_of_timm(spec, DINOV2_FILE_SIZE).items():
        if "giant" in spec.timm_arch:  # SwiGLUFFNFused
            key = key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        if key == "reg_token":
            key = "register_tokens"
        if key == "pos_embed" and spec.registers:
            shape = [1, shape[1] + 1, shape[2]]  # DinoVisionTransformer keeps a CLS position
        shapes[key] = shape
    shapes["mask_token"] = [1, spec.width]
    return shapes


def _dino_head_shapes(width: int, out_dim: int = 65536) -> dict[str, list[int]]:
    return {"mlp.0.weight": [2048, width], "mlp.0.bias": [2048], "mlp.2.weight": [2048, 2048],
            "mlp.2.bias": [2048], "mlp.4.weight": [256, 2048], "mlp.4.bias": [256],
            "last_layer.weight_g": [out_dim, 1], "last_layer.weight_v": [out_dim, 256]}


def _bn_shapes(prefix: str, n: int, affine: bool = True) -> dict[str, list[int]]:
    names = (["weight", "bias"] if affine else []) + ["running_mean", "running_var"]
    return {**{f"{prefix}.{k}": [n] for k in names}, f"{prefix}.num_batches_tracked": []}


def _moco_mlp_shapes(prefix: str, layers: list[tuple[int, int]], last_bn_affine: bool):
    """moco-v3's _build_mlp: Linear(bias=False) [BN ReLU] ... Linear BN(affine=False)."""
    shapes = {}
    for i, (fan_in, fan_out) in enumerate(layers):
        shapes[f"{prefix}.{3 * i}.weight"] = [fan_out, fan_in]
        last = i == len(layers) - 1
        shapes.update(_bn_shapes(f"{prefix}.{3 * i + 1}", fan_out, affine=not last or last_bn_affine))
    return shapes


def _state(shapes: dict[str, list[int]], seed: int, meta: bool) -> dict[str, torch.Tensor]:
    if meta:
        return {k: torch.empty(s, device="meta", dtype=torch.long if k.endswith("tracked") else None)
                for k, s in shapes.items()}
    gen = torch.Generator().manual_seed(seed)
    return {k: random_tensor(k, s, gen) for k, s in shapes.items()}


def _prefixed(prefix: str, sd: dict) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def upstream_file(spec: vit.ViTSpec, seed: int = 0, *, with_head: bool = False,
                  meta: bool = False) -> tuple[object, dict, dict]:
    """(the object the authors' file holds, its backbone, its head in upstream names)."""
    backbone = _state(upstream_backbone_shapes(spec), seed, meta)
    head: dict = {}
    training = {"epoch": 100, "args": argparse.Namespace(arch=spec.timm_arch, lr=np.float64(5e-4))}
    if spec.family in ("dino", "ibot") and with_head:
        head_shapes = _dino_head_shapes(spec.width)
        if spec.family == "ibot":  # its patch head; shared with the CLS head in the teacher
            head_shapes.update({"last_layer2.weight_g": [8192, 1], "last_layer2.weight_v": [8192, 256]})
        head = _state(head_shapes, seed + 1, meta)
        teacher = {**_prefixed("backbone.", backbone), **_prefixed("head.", head)}
        student = _prefixed("module.", teacher)  # DDP-wrapped
        if spec.family == "ibot":
            student["module.backbone.masked_embed"] = _state({"m": [1, spec.width]}, seed, meta)["m"]
        return {"student": student, "teacher": teacher, **training}, backbone, head
    if spec.family == "dino":
        return backbone, backbone, head
    if spec.family == "ibot":  # checkpoint_teacher.pth: extract_backbone_weights' output
        return {"state_dict": backbone}, backbone, head
    if spec.family == "dinov2":
        return backbone, backbone, head
    if spec.family == "mae":
        decoder = _state({"mask_token": [1, 1, 512], "decoder_embed.weight": [512, spec.width],
                          "decoder_embed.bias": [512], "decoder_norm.weight": [512],
                          "decoder_pred.weight": [768, 512]}, seed + 1, meta)
        return {"model": {**backbone, **decoder}, **training}, backbone, head
    assert spec.family == "mocov3"
    projector = _moco_mlp_shapes("head", [(spec.width, 4096), (4096, 4096), (4096, 256)], False)
    head = {k[len("head."):]: v for k, v in _state(projector, seed + 1, meta).items()}
    momentum = _state({**upstream_backbone_shapes(spec), **projector}, seed + 2, meta)
    predictor = _state(_moco_mlp_shapes("predictor", [(256, 4096), (4096, 256)], False), seed + 3, meta)
    state = {**_prefixed("module.base_encoder.", {**backbone, **_prefixed("head.", head)}),
             **_prefixed("module.momentum_encoder.", momentum), **_prefixed("module.", predictor)}
    return {"epoch": 300, "arch": "vit_base", "state_dict": state, "optimizer": {"state": {}}}, backbone, head


# ----------------------------------------------------------------------------- references


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    photo = Image.fromarray(skdata.astronaut())
    return encoder_input(photo, 224, normalize="imagenet").unsqueeze(0)


def timm_reference(spec: vit.ViTSpec, backbone: dict, size: int = 224) -> torch.nn.Module:
    """timm's model, its weights put in by timm's own converter (`checkpoint_filter_fn`, which
    reads DINOv2's layout and resizes position tables timm's way)."""
    with torch.device("meta"):
        model = timm.create_model(spec.timm_arch, num_classes=0, img_size=size, **spec.timm_kwargs)
    model.load_state_dict(checkpoint_filter_fn(dict(backbone), model), strict=True, assign=True)
    return model.eval()


@torch.no_grad()
def reference_tokens(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLS token, mean of the patch tokens), both after the final norm."""
    tokens = model.forward_features(x)
    return tokens[:, 0], tokens[:, model.num_prefix_tokens:].mean(1)


def reference_dino_head(head: dict, x: torch.Tensor) -> torch.Tensor:
    for i in (0, 2):
        x = F.gelu(F.linear(x, head[f"mlp.{i}.weight"], head[f"mlp.{i}.bias"]))
    return F.linear(x, head["mlp.4.weight"], head["mlp.4.bias"])


def reference_moco_projector(head: dict, x: torch.Tensor) -> torch.Tensor:
    for i in range(3):
        x = F.linear(x, head[f"{3 * i}.weight"])
        bn = f"{3 * i + 1}"
        x = (x - head[f"{bn}.running_mean"]) / torch.sqrt(head[f"{bn}.running_var"] + 1e-5)
        if i < 2:
            x = F.relu(x * head[f"{bn}.weight"] + head[f"{bn}.bias"])
    return x


def _encoder(spec, obj, *, pooling="cls", use_head=False, size=224, source=""):
    trunk, head = vit.load_vit(spec, obj, pooling=pooling, use_head=use_head, input_size=size,
                               source=source)
    return get_ssl_models._vit_encoder(trunk, head, use_head)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < TOL, (a - b).abs().max().item()


# ----------------------------------------------------------------------------- tests

# Forwards through a real file, one per layout (ViT-S where there is one); the ViT-B of each layout
# compares its weights with timm's tensor by tensor; every other size loads strictly on the meta
# device (test_every_layout_loads_strictly_shapes_only): the same keys at other widths.
WITH_FILE = ["dino_vits16", "dinov2_vits14_reg", "mae_vitb16", "mocov3_vits16", "ibot_vits16"]
BASE = ["dino_vitb16", "dinov2_vitb14", "dinov2_vitb14_reg", "mocov3_vitb16", "ibot_vitb16"]


def _same_weights(encoder: torch.nn.Module, reference: torch.nn.Module) -> None:
    got, want = encoder.model.vit.state_dict(), reference.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert got[key].shape == want[key].shape and torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("name", BASE)
def test_same_weights_as_timm_s_own_converter(name):
    """Same architecture (timm's, built by name) and, tensor for tensor, the weights timm's
    `checkpoint_filter_fn` makes of the upstream backbone: the same function of the image."""
    spec = vit.VIT_ENCODERS[name]
    obj, backbone, _ = upstream_file(spec, seed=len(name))
    encoder = _encoder(spec, obj)
    reference = timm_reference(spec, backbone)
    if spec.family == "dinov2" and not spec.registers:
        # DINOv2 resizes its 37x37 table with DINO's +0.1 offset, timm without:
        # test_dinov2_resizes_its_table_the_upstream_way checks the table; the rest must agree.
        reference.pos_embed.data = encoder.model.vit.pos_embed.data
    assert type(encoder.model.vit) is type(reference)
    assert encoder.model.vit.default_cfg["architecture"] == spec.timm_arch
    _same_weights(encoder, reference)


@pytest.mark.parametrize("name", WITH_FILE)
def test_representation_equals_timm_on_the_same_weights(name, image, tmp_path):
    spec = vit.VIT_ENCODERS[name]
    obj, backbone, _ = upstream_file(spec, seed=len(name))
    path = tmp_path / "upstream.pth"
    torch.save(obj, path)
    encoder = _encoder(spec, hub.safe_torch_load(path), source=str(path))
    ref_cls, ref_mean = reference_tokens(timm_reference(spec, backbone), image)
    with torch.no_grad():
        cls = encoder(image)
        encoder.model.pooling = "mean_patch"
        mean = encoder(image)
    _close(cls, ref_cls)
    _close(mean, ref_mean)
    assert cls.shape[1] == mean.shape[1] == spec.width
    assert encoder.input_normalize == "imagenet" and encoder.input_size == 224
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


def test_dinov2_resizes_its_table_the_upstream_way(image):
    """DINOv2's interpolate_pos_encoding at 224: bicubic, scale factor (16 + 0.1) / 37, no
    antialiasing (the _reg models: to 16x16 with antialiasing, which is timm's rule, compared
    in test_representation_equals_timm_on_the_same_weights)."""
    spec = vit.VIT_ENCODERS["dinov2_vits14"]
    obj, backbone, _ = upstream_file(spec, seed=3)
    pos = backbone["pos_embed"]
    grid = pos[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic", antialias=False)
    expected = torch.cat([pos[:, :1], resized.permute(0, 2, 3, 1).reshape(1, 256, -1)], dim=1)
    encoder = _encoder(spec, obj)
    _close(encoder.model.vit.pos_embed, expected)
    reference = timm_reference(spec, backbone)
    reference.pos_embed.data = expected
    with torch.no_grad():
        _close(encoder(image), reference_tokens(reference, image)[0])


@pytest.mark.parametrize("name", ["dino_vits16", "ibot_vits16", "mocov3_vits16"])
def test_head_representation_from_the_training_checkpoint(name, image, tmp_path):
    spec = vit.VIT_ENCODERS[name]
    obj, backbone, head = upstream_file(spec, seed=7, with_head=True)
    path = tmp_path / "full_checkpoint.pth"
    torch.save(obj, path)
    encoder = _encoder(spec, hub.safe_torch_load(path), use_head=True, source=str(path))
    ref_cls, _ = reference_tokens(timm_reference(spec, backbone), image)
    expected = (reference_moco_projector(head, ref_cls) if spec.family == "mocov3"
                else reference_dino_head(head, ref_cls))
    with torch.no_grad():
        out = encoder(image)
    _close(out, expected)
    assert out.shape[1] == spec.head_width == 256


@pytest.mark.parametrize("name", list(vit.VIT_ENCODERS))
def test_every_layout_loads_strictly_shapes_only(name):
    """Every encoder, ViT-L/H/g included, on the meta device: no memory, no forward."""
    spec = vit.VIT_ENCODERS[name]
    obj, _, _ = upstream_file(spec, with_head=spec.has_head, meta=True)
    trunk, head = vit.load_vit(spec, obj, use_head=spec.has_head)
    assert trunk.width == spec.width
    if spec.has_head:
        assert head[-1].num_features == 256 if spec.family == "mocov3" else head.mlp[-1].out_features == 256
    # every tensor the model holds came from the file
    assert all(t.is_meta for t in trunk.state_dict().values())
    assert vit.identify(obj).name == name


def test_attention_runs_through_sdpa():
    encoder = get_model("dino_vits16", pretrained=False, input_size=32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, torch.no_grad():
        encoder(torch.zeros(1, 3, 32, 32))
    calls = sum(e.count for e in prof.key_averages() if e.key == "aten::scaled_dot_product_attention")
    assert calls == 12


def test_untrained_encoders_need_no_network(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv(hub.MIRROR_ENV, str(tmp_path / "nothing_here"))
    encoder = get_model("dinov2_vits14_reg", pretrained=False, pooling="mean_patch", input_size=28)
    assert representation_dim(encoder) == 384 and encoder.input_size == 28


def test_published_file_through_the_mirror_and_cache(tmp_path, monkeypatch, image):
    spec = vit.VIT_ENCODERS["ibot_vits16"]
    obj, backbone, _ = upstream_file(spec, seed=11)
    served = tmp_path / "served"
    served.mkdir()
    torch.save(obj, served / "checkpoint_teacher.pth")  # the URL's own name
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with serve_directory(served) as base_url:
        monkeypatch.setenv(hub.MIRROR_ENV, base_url)
        monkeypatch.setitem(hub.PUBLISHED_SHA256, spec.url, sha256(served / "checkpoint_teacher.pth"))
        encoder = get_model("ibot_vits16")
    # cached under a name of its own: every iBOT model's file is called checkpoint_teacher.pth
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / spec.file_name).is_file()
    _same_weights(encoder, timm_reference(spec, backbone))


def test_every_published_file_is_in_the_hub_registry():
    for url in vit.published_files():
        assert url in hub.PUBLISHED_SHA256, url
    names = [n or url.rsplit("/", 1)[1] for url, n in vit.published_files().items()]
    assert len(set(names)) == len(names), "two files would share a cache name"


def test_local_files_are_recognised_by_layout_and_size(tmp_path):
    # (tests/test_vit_training.py trains from a local dinov2_vits14_reg file)
    for seed, name in enumerate(["dinov2_vits14", "mocov3_vits16"]):
        spec = vit.VIT_ENCODERS[name]
        obj, backbone, _ = upstream_file(spec, seed=seed)
        path = tmp_path / f"{name}.pth"
        torch.save(obj, path)
        assert get_ssl_models.detect_layout(hub.safe_torch_load(path)) == name
        assert get_ssl_models.native_input_normalize(str(path)) == "imagenet"
        encoder = get_model(str(path))
        reference = timm_reference(spec, backbone)
        if spec.family == "dinov2" and not spec.registers:
            reference.pos_embed.data = encoder.model.vit.pos_embed.data  # see the resizing test
        _same_weights(encoder, reference)


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def test_wrong_layouts_are_one_clear_line(tmp_path):
    dino, _, _ = upstream_file(vit.VIT_ENCODERS["dino_vits16"], meta=True)
    with pytest.raises(hub.CheckpointError) as err:
        vit.load_vit("dinov2_vits14", dino, source="dino.pth")
    assert "dino.pth: not a DINOv2 ViT checkpoint" in _one_line(err)
    with pytest.raises(hub.CheckpointError) as err:
        vit.load_vit("mae_vitb16", {"state_dict": dino})
    assert "not a MAE ViT checkpoint: expected {'model'" in _one_line(err)
    # the right layout, another size: names the first tensor that differs
    vitb, _, _ = upstream_file(vit.VIT_ENCODERS["dinov2_vitb14"], meta=True)
    with pytest.raises(hub.CheckpointMismatchError) as err:
        vit.load_vit("dinov2_vits14", vitb, source="b.pth")
    assert "b.pth: dinov2_vits14 backbone does not fit" in _one_line(err)
    assert "file [1, 1, 768], model [1, 1, 384]" in _one_line(err)
    # a DINO backbone file has no head
    with pytest.raises(hub.CheckpointError) as err:
        vit.load_vit("dino_vits16", dino, use_head=True)
    assert "dino_deitsmall16_pretrain_full_checkpoint.pth" in _one_line(err)
    # a ViT of no known size
    odd = {k: v for k, v in dino.items() if not k.startswith("blocks.11.")}
    with pytest.raises(hub.CheckpointError) as err:
        get_ssl_models.detect_layout(odd)
    assert "11 blocks" in _one_line(err) and "dino_vits16" in str(err.value)


def test_bad_choices_are_one_clear_line():
    for kwargs, words in [
        ({"use_head": True}, "`use_head`: mae_vitb16 has no projector head"),
        ({"pooling": "max"}, "`pooling` 'max'"),
        ({"input_size": 100}, "`input_size` 100: mae_vitb16 needs a multiple of its patch size 16 (e.g. 96)"),
        ({"use_head": True, "pooling": "mean_patch", "model": "dino_vits16"},
         "`use_head` with `pooling` mean_patch"),
    ]:
        with pytest.raises(ValueError) as err:
            get_model(kwargs.pop("model", "mae_vitb16"), pretrained=False, **kwargs)
        assert words in _one_line(err)
    with pytest.raises(ValueError) as err:
        get_model("dino", pretrained=False, pooling="mean_patch")
    assert "not a Vision Transformer" in _one_line(err)


def test_a_cached_file_of_another_layout_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    spec = vit.VIT_ENCODERS["dinov2_vits14"]
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    obj, _, _ = upstream_file(vit.VIT_ENCODERS["dino_vits16"])
    torch.save(obj, cache / spec.url.rsplit("/", 1)[1])
    with pytest.raises(hub.CheckpointError) as err:
        get_model("dinov2_vits14")
    assert "dinov2_vits14_pretrain.pth: not a DINOv2 ViT checkpoint" in _one_line(err)


def test_smaller_inputs_resize_the_table_the_method_s_way(image):
    """DINO at 64 pixels: its interpolate_pos_encoding (scale factor (4 + 0.1) / 14)."""
    spec = vit.VIT_ENCODERS["dino_vits16"]
    obj, backbone, _ = upstream_file(spec, seed=5)
    encoder = _encoder(spec, obj, size=64)
    pos = backbone["pos_embed"]
    grid = pos[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, scale_factor=(4.1 / 14, 4.1 / 14), mode="bicubic")
    _close(encoder.model.vit.pos_embed, torch.cat([pos[:, :1], resized.permute(0, 2, 3, 1).reshape(1, 16, -1)], 1))
    assert encoder.input_size == 64
    small = F.interpolate(image, size=(64, 64), mode="bilinear", antialias=True)
    assert encoder(small).shape == (1, 384) and math.isfinite(encoder(small).abs().sum().item())


def test_the_readme_table_lists_every_encoder_with_its_widths():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name, spec in vit.VIT_ENCODERS.items():
        head = str(spec.head_width) if spec.has_head else "-"
        row = re.search(rf"^\| `{name}` \| [^|]+ \| (\d+) / (\d+) / ([\d-]+) \| (.+) \|$", readme, re.M)
        assert row, f"README's encoder table has no row for {name}"
        assert row.groups()[:3] == (str(spec.width), str(spec.width), head), name
        assert spec.url in row.group(4) and (not spec.has_head or spec.head_url in row.group(4)), name


def test_bf16_autocast_runs_the_vit_in_bf16_and_stays_close():
    """What --encoder_precision bf16 (or auto, where the CPU runs bf16 natively and faster) does."""
    spec = vit.VIT_ENCODERS["dino_vits16"]
    obj, _, _ = upstream_file(spec, seed=2)
    encoder = _encoder(spec, obj, size=64)
    seen = []
    encoder.model.vit.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        exact = encoder(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = encoder(x).float()
    assert seen == [torch.float32, torch.bfloat16]
    assert ((fast - exact).norm() / exact.norm()).item() < 3e-2


# ----------------------------------------------------------------------------- the authors' own files


def test_ibot_s_own_file_name_placed_by_hand_in_the_cache(tmp_path, monkeypatch):
    """Every iBOT size's file is called checkpoint_teacher.pth: in a folder named after the model (or
    the URL's folder) it is used; loose in the cache, the error names the file expected."""
    spec = vit.VIT_ENCODERS["ibot_vits16"]
    obj, backbone, _ = upstream_file(spec, seed=7)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv(hub.MIRROR_ENV, closed_port_url())  # offline
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    loose = cache / "checkpoint_teacher.pth"
    torch.save(obj, loose)
    with pytest.raises(hub.DownloadError) as err:
        get_model("ibot_vits16")
    text = str(err.value)
    assert str(cache / "ibot_vits_16_checkpoint_teacher.pth") in text
    assert f"{loose} is there" in text and "rename it to ibot_vits_16_checkpoint_teacher.pth" in text
    assert str(cache / "vits_16" / "checkpoint_teacher.pth") in text

    (cache / "vits_16").mkdir()
    loose.rename(cache / "vits_16" / "checkpoint_teacher.pth")
    assert vit.local_copy(spec) == cache / "vits_16" / "checkpoint_teacher.pth"
    assert vit.local_copy(vit.VIT_ENCODERS["ibot_vitb16"]) is None  # the folder says which model
    (cache / "ibot_vits16").mkdir()
    (cache / "vits_16" / "checkpoint_teacher.pth").rename(cache / "ibot_vits16" / "checkpoint_teacher.pth")
    _same_weights(get_model("ibot_vits16"), timm_reference(spec, backbone))


@pytest.fixture(scope="module")
def mocov3_deit_file(tmp_path_factory):
    """What MoCo v3's convert_to_deit.py writes from the ViT-S training file: the base encoder's
    backbone (its projector `head.*` left out), prefixes removed, under "model"."""
    spec = vit.VIT_ENCODERS["mocov3_vits16"]
    obj, backbone, _ = upstream_file(spec, seed=4)
    prefix = "module.base_encoder."
    model = {k[len(prefix):]: v for k, v in obj["state_dict"].items()
             if k.startswith(prefix) and not k.startswith(prefix + "head")}
    path = tmp_path_factory.mktemp("deit") / "vit-s-300ep_deit.pth"
    torch.save({"model": model}, path)
    return path, backbone


def test_mocov3_convert_to_deit_output_loads_as_mocov3(mocov3_deit_file):
    path, backbone = mocov3_deit_file
    spec = vit.VIT_ENCODERS["mocov3_vits16"]
    assert get_ssl_models.detect_layout(hub.safe_torch_load(path)) == "mocov3_vits16"
    encoder = get_model(str(path))
    assert encoder.model.vit.blocks[0].attn.num_heads == 12  # MoCo v3's ViT-S, not timm's 6 heads
    _same_weights(encoder, timm_reference(spec, backbone))
    with pytest.raises(hub.CheckpointError) as err:
        get_model(str(path), use_head=True)
    assert "holds no MoCo v3 head" in _one_line(err)
    # this layout at no known size names both methods that write it
    odd = {"model": {k: v for k, v in hub.safe_torch_load(path)["model"].items() if not k.startswith("blocks.11.")}}
    with pytest.raises(hub.CheckpointError) as err:
        get_ssl_models.detect_layout(odd)
    assert "convert_to_deit.py" in _one_line(err) and "mocov3_vits16" in str(err.value)
    assert "mae_vitb16" in str(err.value)


def test_a_local_vit_file_records_its_pooling(mocov3_deit_file):
    from guided_diffusion_rcdm.encoders import EncoderSpec

    path, _ = mocov3_deit_file
    record = EncoderSpec(str(path)).to_dict()
    assert record["pooling"] == "cls" and record["normalize"] == "imagenet" and record["input_size"] == 224
    assert EncoderSpec(str(path), pooling="mean_patch").to_dict()["pooling"] == "mean_patch"
