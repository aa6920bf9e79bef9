"""UNet structure and options: the published checkpoint layout, attention orders, gradient
checkpointing, fp16 conversion and the representation input."""

import json

import pytest
import torch

from guided_diffusion_rcdm.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    create_model,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from guided_diffusion_rcdm.unet import QKVAttention, QKVAttentionLegacy

MODEL_FLAGS_128 = (
    "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --image_size 128 "
    "--learn_sigma True --noise_schedule linear --num_channels 256 --num_heads 4 --num_res_blocks 2 "
    "--resblock_updown True --use_fp16 False --use_scale_shift_norm True"
)
TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16")


def parse_flags(argv):
    import argparse

    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, model_and_diffusion_defaults())
    return args_to_dict(parser.parse_args(argv), model_and_diffusion_defaults().keys())


def test_model_flags_128_parse_to_the_published_flags(reference_dir):
    flags = parse_flags(MODEL_FLAGS_128.split())
    published = json.loads((reference_dir / "pretrained_128_keys.json").read_text())["flags"]
    for key, value in published.items():
        assert flags[key] == value, key


@pytest.mark.parametrize("encoder", ["trunk", "simclr_head", "dino_head", "barlow_head", "vicreg_head"])
def test_published_128_layout_for_every_encoder(reference_dir, encoder):
    published = json.loads((reference_dir / "pretrained_128_keys.json").read_text())
    ssl_dim = published["ssl_dims"][encoder]
    with torch.device("meta"):
        model, _ = create_model_and_diffusion(
            **parse_flags(MODEL_FLAGS_128.split()), feat_cond=True, ssl_dim=ssl_dim, G_shared=False
        )
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = dict(published["state_dict"])
    expected["ssl_emb.weight"] = [expected["ssl_emb.weight"][0], ssl_dim]
    assert len(shapes) == 494
    assert list(shapes) == list(expected), "parameter names or order differ from the checkpoint"
    assert shapes == expected
    if encoder == "trunk":
        assert sum(p.numel() for p in model.parameters()) == published["num_params"]
    # strict loading of a state dict with exactly that layout
    model.load_state_dict({k: torch.empty(s, device="meta") for k, s in expected.items()}, strict=True, assign=True)


def test_attention_orders_agree_on_permuted_qkv():
    torch.manual_seed(0)
    heads, ch, length = 4, 8, 10
    q, k, v = (torch.randn(2, heads, ch, length) for _ in range(3))
    legacy = torch.stack([q, k, v], dim=2).reshape(2, heads * 3 * ch, length)
    new = torch.stack([q, k, v], dim=1).reshape(2, 3 * heads * ch, length)
    expected = torch.softmax(torch.einsum("bhct,bhcs->bhts", q, k) / ch**0.5, dim=-1)
    expected = torch.einsum("bhts,bhcs->bhct", expected, v).reshape(2, heads * ch, length)
    torch.testing.assert_close(QKVAttentionLegacy(heads)(legacy), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(QKVAttention(heads)(new), expected, atol=1e-5, rtol=1e-5)


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_gradient_checkpointing_gives_the_same_gradients():
    results = []
    for use_checkpoint in (False, True):
        model = _randomise(create_model(**TINY, use_checkpoint=use_checkpoint, feat_cond=True, ssl_dim=16))
        torch.manual_seed(1)
        x, feat = torch.randn(2, 3, 32, 32), torch.randn(2, 16)
        model(x, torch.tensor([5, 50]), feat=feat).square().mean().backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in results[0].items():
        torch.testing.assert_close(results[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_fp16_conversion_halves_the_torso_only():
    model = create_model(**TINY, use_fp16=True)
    assert model.dtype == torch.float32  # nothing converted until asked, as the original
    model.convert_to_fp16()
    assert model.input_blocks[0][0].weight.dtype == torch.float16
    assert model.time_embed[0].weight.dtype == torch.float32
    assert model.out[2].weight.dtype == torch.float32
    model.convert_to_fp32()
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_representation_changes_the_output_and_is_checked():
    model = _randomise(create_model(**TINY, feat_cond=True, ssl_dim=16)).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 10])
    feat = torch.randn(2, 16)
    with torch.no_grad():
        a, b = model(x, t, feat=feat), model(x, t, feat=feat + 1)
        unconditional = model(x, t)
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, unconditional)
    with pytest.raises(ValueError, match="ssl_dim=16"):
        model(x, t, feat=torch.randn(2, 32))
    plain = create_model(**TINY)
    with pytest.raises(ValueError, match="feat_cond"):
        plain(x, t, feat=feat)


def test_class_conditional_needs_labels():
    model = create_model(**TINY, class_cond=True)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    assert model(x, t, y=torch.tensor([0, 999])).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="class"):
        model(x, t)


def test_default_channel_mult_per_image_size():
    for size, depth in ((64, 4), (128, 5)):
        with torch.device("meta"):
            model = create_model(size, 32, 1, attention_resolutions="16")
        assert len(model.channel_mult) == depth
