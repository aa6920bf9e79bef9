"""Encoders from timm, Hugging Face transformers, OpenCLIP and the user's own factory.

Each source gets a tiny random-weight model saved in its library's own format (a timm weights
file loaded through `--encoder_weights`, a `save_pretrained` folder with its image processor, an
OpenCLIP state-dict file, a factory in a module of a temporary folder): the project's features
equal the library's own forward on the same images within 1e-5, and the spec records the
library's preprocessing. A tiny RCDM trained on an `hf:` representation is sampled from its
checkpoint alone and scored by `rcdm eval`. The user's mistakes are one line, exit status 2, and
write nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch
import transformers
from timm.data import resolve_data_config
from torchvision import transforms

from _sampling_helpers import write_photos
from guided_diffusion_rcdm.cli import cache, evaluate, sample, train
from guided_diffusion_rcdm.encoders import EncoderSpec, encode_images
from guided_diffusion_rcdm.encoders import adapters
from guided_diffusion_rcdm.image_datasets import IMAGENET_MEAN, IMAGENET_STD, parse_normalization
from test_cli import _user_error

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # written into the tiny processors, read back
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FACTORY = '''
import torch
from torch import nn

def tiny():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return net, {"input_size": 24, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.25]}

def plain():
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv2d(3, 4, 5), nn.AdaptiveAvgPool2d(1), nn.Flatten())

def broken():
    raise RuntimeError("no GPU here")

def not_a_module():
    return "resnet50"
'''


def _vit_config(cls, **extra):
    return cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
               patch_size=8, **extra)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random-weight models of each library, saved in its own format."""
    root = tmp_path_factory.mktemp("library_encoders")
    out = {"root": root}
    torch.manual_seed(0)
    # timm: a weights file for timm's own loader
    vit = timm.create_model("test_vit", pretrained=False)
    torch.save(vit.state_dict(), root / "test_vit.pth")
    out["timm_file"] = root / "test_vit.pth"
    # transformers: save_pretrained folders with their image processors
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=list(CLIP_MEAN),
                                               image_std=list(CLIP_STD))
    for name, model in (
        ("hf_vit", transformers.ViTModel(_vit_config(transformers.ViTConfig))),
        ("hf_dinov2", transformers.Dinov2Model(_vit_config(transformers.Dinov2Config))),
        ("hf_clip_vision", transformers.CLIPVisionModelWithProjection(
            _vit_config(transformers.CLIPVisionConfig, projection_dim=16))),
    ):
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
        out[name] = root / name
    (root / "hf_no_config").mkdir()
    processor.save_pretrained(root / "hf_no_config")
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=64, vocab_size=100))
    bert.save_pretrained(root / "hf_bert")
    processor.save_pretrained(root / "hf_bert")
    out["hf_bert"] = root / "hf_bert"
    # OpenCLIP: a tiny architecture of its own config format, its weights in a file
    configs = root / "open_clip_configs"
    configs.mkdir()
    (configs / "rcdm-tiny-vit.json").write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(configs)
    clip_model = open_clip.create_model("rcdm-tiny-vit")
    torch.save(clip_model.state_dict(), root / "tiny_clip.pt")
    out["clip_file"] = root / "tiny_clip.pt"
    # the user's own code
    (root / "rcdm_user_encoders.py").write_text(FACTORY)
    sys.path.insert(0, str(root))
    out["photos"] = write_photos(root / "photos", short_side=48)
    yield out
    sys.path.remove(str(root))


def _images(size: int, n: int = 3) -> torch.Tensor:
    """n images in [-1, 1]: the photos as RCDM's crop makes them."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(size)) * 2 - 1


def _library_input(x: torch.Tensor, mean, std) -> torch.Tensor:
    """What the library's own preprocessing gives for images in [0, 1]: its Normalize."""
    return transforms.Normalize(mean, std)((x + 1) / 2)


def _ours(spec: EncoderSpec, x: torch.Tensor) -> torch.Tensor:
    return encode_images(spec.build(), x).features


def test_timm_features_equal_timm_forward(models):
    spec = EncoderSpec("timm:test_vit", weights=str(models["timm_file"]))
    lib = timm.create_model("test_vit", pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(models["timm_file"]))).eval()
    config = resolve_data_config({}, model=lib)
    assert spec.input_size == config["input_size"][-1] == 160
    assert parse_normalization(spec.input_normalize) in (None, (config["mean"], config["std"]))
    x = _images(spec.input_size)
    with torch.no_grad():
        tokens = lib.forward_features(_library_input(x, config["mean"], config["std"]))
        pooled = lib.forward_head(tokens, pre_logits=True)
    encoder = spec.build()
    torch.testing.assert_close(encode_images(encoder, x).features, pooled, rtol=0, atol=1e-5)
    mean_patch = EncoderSpec("timm:test_vit", weights=str(models["timm_file"]), pooling="mean_patch")
    torch.testing.assert_close(_ours(mean_patch, x), tokens[:, lib.num_prefix_tokens:].mean(1), rtol=0, atol=1e-5)
    record = encoder.spec.to_dict()
    assert record["source"] == "timm" and record["weights"] == str(models["timm_file"])
    assert len(record["weights_sha256"]) == 64 and record["width"] == pooled.shape[1]
    assert EncoderSpec.from_dict(record) == encoder.spec


@pytest.mark.parametrize("folder,pooling", [("hf_vit", ""), ("hf_dinov2", "mean_patch"), ("hf_clip_vision", "")])
def test_transformers_features_equal_the_model_outputs(models, folder, pooling):
    path = models[folder]
    spec = EncoderSpec(f"hf:{path}", pooling=pooling)
    processor = transformers.AutoImageProcessor.from_pretrained(path)
    assert spec.input_size == processor.size["height"] == 32
    assert parse_normalization(spec.input_normalize) == (CLIP_MEAN, CLIP_STD)
    saved_as = getattr(transformers, transformers.AutoConfig.from_pretrained(path).architectures[0])
    lib = saved_as.from_pretrained(path).eval()
    x = _images(32)
    with torch.no_grad():
        out = lib(pixel_values=_library_input(x, processor.image_mean, processor.image_std))
    if folder == "hf_clip_vision":
        want = out.image_embeds
    elif pooling == "mean_patch":
        want = out.last_hidden_state[:, 1:].mean(1)  # after the CLS token
    else:
        want = out.pooler_output
    encoder = spec.build()
    torch.testing.assert_close(encode_images(encoder, x).features, want, rtol=0, atol=1e-5)
    assert encoder.spec.width == want.shape[1] and len(encoder.spec.weights_sha256) == 64


def test_open_clip_features_equal_encode_image(models):
    name = f"open_clip:rcdm-tiny-vit:{models['clip_file']}"
    spec = EncoderSpec(name)
    lib, _, preprocess = open_clip.create_model_and_transforms("rcdm-tiny-vit", pretrained=str(models["clip_file"]))
    norm = next(t for t in preprocess.transforms if isinstance(t, transforms.Normalize))
    assert spec.input_size == 32 and parse_normalization(spec.input_normalize) == (tuple(norm.mean), tuple(norm.std))
    x = _images(32)
    with torch.no_grad():
        want = lib.eval().encode_image(_library_input(x, norm.mean, norm.std))
    encoder = spec.build()
    torch.testing.assert_close(encode_images(encoder, x).features, want, rtol=0, atol=1e-5)
    assert encoder.spec.to_dict()["weights_sha256"] and encoder.spec.width == 16


def test_a_factory_of_the_users_own_code(models):
    spec = EncoderSpec("py:rcdm_user_encoders:tiny")
    assert spec.input_size == 24 and parse_normalization(spec.input_normalize) == ((0.4, 0.5, 0.6), (0.2, 0.3, 0.25))
    import rcdm_user_encoders

    net, info = rcdm_user_encoders.tiny()
    x = _images(24)
    with torch.no_grad():
        want = net.eval()(_library_input(x, info["mean"], info["std"]))
    torch.testing.assert_close(_ours(spec, x), want, rtol=0, atol=1e-5)
    plain = EncoderSpec("py:rcdm_user_encoders:plain")  # a bare module: 224 pixels, ImageNet mean/std
    assert (plain.input_size, parse_normalization(plain.input_normalize)) == (224, (IMAGENET_MEAN, IMAGENET_STD))


def test_train_on_an_hf_encoder_then_sample_and_score_from_the_checkpoint_alone(models, tmp_path, capsys):
    photos = str(Path(models["photos"][0]).parent)
    run = tmp_path / "run"
    argv = ["--data_dir", photos, "--out_dir", run, "--feat_cond", "True", "--type_model", f"hf:{models['hf_vit']}",
            "--image_size", "32", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
            "--attention_resolutions", "16", "--diffusion_steps", "50", "--batch_size", "2", "--max_steps", "2",
            "--save_interval", "2", "--num_workers", "0", "--progress", "False"]
    assert train.main(list(map(str, argv))) == 0, capsys.readouterr().err
    checkpoint = sorted(run.glob("ema_*.pt"))[-1]
    out = tmp_path / "samples"
    assert sample.main("sample", list(map(str, [
        "--model_path", checkpoint, "--data_dir", photos, "--num_images", "2", "--batch_size", "2",
        "--timestep_respacing", "3", "--device", "cpu", "--out_dir", out, "--progress", "False"]))) == 0, \
        capsys.readouterr().err
    npz = next(out.glob("*.npz"))
    with np.load(npz) as data:
        assert str(data["type_model"]) == f"hf:{models['hf_vit']}"
    scores = tmp_path / "scores.json"
    assert evaluate.main(list(map(str, [npz, "--device", "cpu", "--out_json", scores, "--num_shuffles", "2"]))) == 0, \
        capsys.readouterr().err
    report = json.loads(scores.read_text())
    assert report["encoder"]["type_model"] == f"hf:{models['hf_vit']}" and report["encoder"]["source"] == "hf"
    assert report["encoder"]["width"] == 32


def test_mistakes_are_one_line_status_2_and_write_nothing(models, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    photos = str(Path(models["photos"][0]).parent)
    feat_cache = tmp_path / "cache"

    def run(*flags):
        return lambda argv: cache.main([*argv, *map(str, flags)])

    common = ["--data_dir", photos, "--feat_cache", str(feat_cache)]
    cases = [
        (("--type_model", f"hf:{models['root'] / 'hf_no_config'}"), ("no config.json", "save_pretrained")),
        (("--type_model", f"hf:{models['hf_bert']}"), ("hf:", "not a vision model")),
        (("--type_model", f"hf:{models['root'] / 'nowhere'}"), ("no such folder",)),
        (("--type_model", "py:rcdm_user_encoders:broken"), ("the factory raised RuntimeError: no GPU here",)),
        (("--type_model", "py:rcdm_user_encoders:not_a_module"), ("must return an nn.Module", "str")),
        (("--type_model", "py:rcdm_no_such_module:f"), ("cannot import rcdm_no_such_module",)),
        (("--type_model", "timm:test_vit", "--encoder_weights", models["root"] / "none.pth"),
         ("--encoder_weights", "no such file")),
        (("--type_model", "timm:no_such_net"), ("timm", "no such model")),
        (("--type_model", "open_clip:rcdm-tiny-vit"), ("names no weights", "--pretrained_encoder False")),
        (("--type_model", "py:rcdm_user_encoders:tiny", "--encoder_pooling", "cls"), ("--encoder_pooling cls",)),
    ]
    for flags, expect in cases:
        _user_error(capsys, run(*flags), common, feat_cache, *expect)
    # offline, and what is asked for is not in the cache: one line naming what to fetch and where
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _user_error(capsys, run("--type_model", "hf:nobody/rcdm-not-a-model"), common, feat_cache,
                "hf download nobody/rcdm-not-a-model", constants.HF_HUB_CACHE)
    _user_error(capsys, run("--type_model", "timm:test_vit"), common, feat_cache,
                "timm:test_vit", "--encoder_weights FILE", constants.HF_HUB_CACHE)
    # a library that is not installed: one line naming the extra
    adapters.native_preprocess.cache_clear()
    monkeypatch.setitem(sys.modules, "open_clip", None)
    _user_error(capsys, run("--type_model", "open_clip:ViT-B-32", "--pretrained_encoder", "False"), common,
                feat_cache, 'pip install "guided-diffusion-rcdm[clip]"')
