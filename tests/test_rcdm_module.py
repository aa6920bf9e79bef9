"""The RCDM module: building from a checkpoint's meta or from flags, per-image sampling, shared noise."""

from __future__ import annotations

import argparse
import warnings

import pytest
import torch

from _sampling_helpers import ENCODER, SSL_DIM, TINY_FLAGS, make_tiny_checkpoint, write_photos
from guided_diffusion_rcdm import hub
from guided_diffusion_rcdm.encoders import EncoderSpec
from guided_diffusion_rcdm.image_datasets import encoder_input
from guided_diffusion_rcdm.precision import AutocastModel
from guided_diffusion_rcdm.RCDM import RCDM
from guided_diffusion_rcdm.errors import UsageError


# Samples of one representation and one noise in two rows of a batch: equal in exact arithmetic, but
# a CPU's matrix kernels may round a row differently by its position (AVX2 kernels: 3e-5 after a
# 4-step chain), far below the 1e-3 that tells other representations apart.
SAME_UP_TO_ROUNDING = 2e-4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rcdm")
    return {
        "ckpt": make_tiny_checkpoint(root / "tiny.pt"),
        "photos": write_photos(root / "photos", names=("astronaut", "coffee", "chelsea")),
        "root": root,
    }


@pytest.fixture(scope="module")
def rcdm(files):
    # Only the checkpoint and a sampling choice: the architecture and encoder come from its meta.
    return RCDM(model_path=files["ckpt"], timestep_respacing="4", progress=False)


def test_builds_from_the_checkpoint_meta_alone(rcdm):
    assert rcdm.image_size == TINY_FLAGS["image_size"]  # not the default 64
    assert rcdm.ssl_dim == SSL_DIM and rcdm.model_flags["num_channels"] == TINY_FLAGS["num_channels"]
    assert rcdm.encoder_spec == EncoderSpec.from_dict(ENCODER) and rcdm.encoder_spec.width == SSL_DIM
    assert rcdm.diffusion.num_timesteps == 4 and rcdm.sampler == "ddpm"
    assert not any(p.requires_grad for p in rcdm.ssl_model.parameters())
    assert not rcdm.rcdm_model.training
    # the original's namespace style works too
    ns = argparse.Namespace(model_path=rcdm.args.model_path, timestep_respacing="4", use_ddim=True,
                            type_model="dino", use_head=False, image_size=64, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = RCDM(ns)
    assert other.sampler == "ddim" and other.image_size == 32


def test_forward_gives_num_samples_per_image_from_its_own_representation(rcdm, files):
    batch = torch.stack([encoder_input(p) for p in files["photos"][:2]])
    torch.manual_seed(5)
    out = rcdm(batch, num_samples=3)
    assert out.shape == (6, 3, 32, 32)
    assert out.min() >= -1 and out.max() <= 1 and out.std() > 0.05
    # the same draws, image by image, from each image's own representation
    torch.manual_seed(5)
    feats = rcdm.encode(files["photos"][:2])
    want = torch.cat([rcdm.sample(f.expand(3, -1)) for f in feats])
    torch.testing.assert_close(out, want)
    assert not torch.allclose(feats[0], feats[1])


def test_forward_accepts_a_path_and_other_tensor_sizes(rcdm, files):
    torch.manual_seed(0)
    from_path = rcdm(files["photos"][0], num_samples=2)
    assert from_path.shape == (2, 3, 32, 32)
    # a 3xHxW tensor of another size is resized to the encoder's 224 before encoding
    feat = rcdm.encode(encoder_input(files["photos"][0], size=112))
    torch.testing.assert_close(feat, rcdm.encode(files["photos"][0]), atol=0.5, rtol=0.2)


def test_same_seed_same_samples_other_seed_other_samples(rcdm, files):
    feat = rcdm.encode(files["photos"][0]).expand(2, -1)
    torch.manual_seed(11)
    a = rcdm.sample(feat)
    torch.manual_seed(11)
    b = rcdm.sample(feat)
    torch.manual_seed(12)
    c = rcdm.sample(feat)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.05


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_shared_noise_makes_only_the_representation_differ(files, sampler):
    model = RCDM(model_path=files["ckpt"], timestep_respacing="4", sampler=sampler, progress=False)
    feats = model.encode(files["photos"])  # three different representations
    feats = torch.cat([feats[:1], feats[:1], feats[1:]])  # the first one twice
    torch.manual_seed(3)
    out = model.sample_shared_noise(feats, num_samples=2)
    assert out.shape == (4, 2, 3, 32, 32)
    # same representation + same noise (every step's, for DDPM) = the same samples, up to the
    # rounding of a batch row's position, which some CPUs' kernels differ in (SAME_UP_TO_ROUNDING)
    torch.testing.assert_close(out[0], out[1], atol=SAME_UP_TO_ROUNDING, rtol=0)
    # another representation with the same noise: other samples; other noise (column): other samples
    assert (out[0] - out[2]).abs().mean() > 1e-3
    assert (out[0, 0] - out[0, 1]).abs().mean() > 0.05
    # one batch, and the caller's generator advanced by it (the next call draws other noise)
    again = model.sample_shared_noise(feats[:1], num_samples=2)
    assert (again[0] - out[0]).abs().mean() > 0.05


def test_interpolate_uses_exactly_the_two_representations_at_the_ends(rcdm, files):
    a, b = rcdm.encode(files["photos"][:2])
    torch.manual_seed(0)
    out = rcdm.interpolate(a, b, 4)
    assert out["methods"] == ["linear", "spherical"] and out["alphas"][0] == 0 and out["alphas"][-1] == 1
    assert out["samples"].shape == (2, 4, 1, 3, 32, 32)
    for m in range(2):
        assert torch.equal(out["features"][m, 0], a) and torch.equal(out["features"][m, -1], b)
    # both methods start and end at the same representation with the same noise
    torch.testing.assert_close(out["samples"][0, 0], out["samples"][1, 0], atol=SAME_UP_TO_ROUNDING, rtol=0)
    torch.testing.assert_close(out["samples"][0, -1], out["samples"][1, -1], atol=SAME_UP_TO_ROUNDING, rtol=0)
    assert (out["samples"][0, 0] - out["samples"][0, -1]).abs().mean() > 1e-3


def test_manipulate_changes_only_the_shared_dimensions(rcdm, files):
    feats = rcdm.encode(files["photos"])
    torch.manual_seed(0)
    out = rcdm.manipulate(feats[0], feats[2], feats, n_neighbors=3, n_common=2, num_samples=2)
    original, zeroed, moved = out["features"]
    dims = out["dims"]
    assert torch.equal(dims, torch.nonzero(out["counts"] > 2).flatten())
    assert 0 < len(dims) < SSL_DIM
    assert torch.equal(original, feats[0])
    others = torch.ones(SSL_DIM, dtype=torch.bool)
    others[dims] = False
    assert (zeroed[dims] == 0).all() and torch.equal(zeroed[others], original[others])
    assert torch.equal(moved[dims], feats[2][dims]) and torch.equal(moved[others], original[others])
    assert int(out["neighbors"][0]) == 0  # the source is in the folder: its own nearest neighbour
    assert out["samples"].shape == (3, 2, 3, 32, 32)
    with pytest.raises(UsageError, match="`n_neighbors` 5: only 3"):
        rcdm.manipulate(feats[0], feats[2], feats, n_neighbors=5, n_common=2)


def test_bf16_precision_runs_the_unet_under_autocast(files):
    model = RCDM(model_path=files["ckpt"], timestep_respacing="2", precision="bf16", progress=False)
    feat = model.encode(files["photos"][0])
    out = model.sample(feat.expand(2, -1))
    assert isinstance(model._model_for_sampling(), AutocastModel)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_checkpoint_flags_win_over_conflicting_command_line_flags(files):
    with pytest.warns(UserWarning, match=r"--num_channels 64 \(checkpoint: 32\)"):
        model = RCDM(model_path=files["ckpt"], timestep_respacing="2", num_channels=64, progress=False)
    assert model.model_flags["num_channels"] == 32


def test_plain_state_dict_takes_its_flags_from_the_command_line(files):
    sd, _ = hub.load_checkpoint(files["ckpt"])
    plain = files["root"] / "plain.pt"
    torch.save(sd, plain)
    args = dict(model_path=str(plain), type_model="resnet18", pretrained_encoder=False,
                timestep_respacing="2", progress=False)
    model = RCDM(**args, **TINY_FLAGS)
    assert model.image_size == 32 and model.ssl_dim == SSL_DIM
    with pytest.raises(hub.CheckpointMismatchError, match="num_channels|shape"):
        RCDM(**args, **{**TINY_FLAGS, "num_channels": 64})


def test_an_encoder_of_another_width_is_refused_with_the_reason(files):
    with pytest.raises(UsageError, match=r"`type_model` resnet50 gives 2048-d representations.*512-d"):
        RCDM(model_path=files["ckpt"], type_model="resnet50", pretrained_encoder=False, progress=False)


def test_guidance_and_new_architectures_come_from_the_checkpoint(files):
    # A model trained with representation dropout and the paper's conditional batch norm: the
    # meta alone rebuilds it, and --guidance_scale changes its samples.
    ckpt = make_tiny_checkpoint(files["root"] / "guided.pt", norm_style="cbn", feat_drop_prob=0.1)
    plain = RCDM(model_path=ckpt, timestep_respacing="3", sampler="ddim", progress=False)
    guided = RCDM(model_path=ckpt, timestep_respacing="3", sampler="ddim", guidance_scale=3.0,
                  progress=False)
    assert plain.model_flags["norm_style"] == "cbn" and plain.rcdm_model.supports_guidance
    feat = plain.encode(files["photos"][0]).expand(2, -1)
    noise = torch.randn(2, 3, 32, 32)
    a = plain.sample(feat, noise=noise.clone())
    b = guided.sample(feat, noise=noise.clone())
    assert torch.isfinite(b).all() and (a - b).abs().mean() > 1e-3
    with pytest.raises(UsageError, match="`guidance_scale` 2.0 needs a model trained with `feat_drop_prob`"):
        RCDM(model_path=files["ckpt"], guidance_scale=2.0, progress=False)


# ----------------------------------------------------------------------------- keyword API


def test_from_checkpoint_matches_the_flag_constructor(rcdm, files):
    kw = RCDM.from_checkpoint(files["ckpt"], timestep_respacing="4", progress=False, device="cpu")
    assert kw.image_size == rcdm.image_size and kw.encoder_info == rcdm.encoder_info
    assert kw.sampler == "ddpm" and kw.precision == "fp32" and kw.device.type == "cpu"
    for (name, a), b in zip(rcdm.rcdm_model.state_dict().items(), kw.rcdm_model.state_dict().values()):
        assert torch.equal(a, b), name
    feat = rcdm.encode(files["photos"][0])
    torch.manual_seed(4)
    want = rcdm.sample(feat.expand(2, -1))
    torch.manual_seed(4)
    torch.testing.assert_close(kw.sample(feat.expand(2, -1)), want)
    # the sampler and its number of steps are plain keywords
    fast = RCDM.from_checkpoint(files["ckpt"], sampler="dpm++", steps=3, progress=False)
    assert fast.sampler == "dpm++" and fast.sampling.steps == 3 and fast.diffusion.num_timesteps == 100
    assert fast.sample(feat.expand(2, -1)).shape == (2, 3, 32, 32)


def test_images_may_be_paths_pil_images_or_tensors(rcdm, files):
    from PIL import Image

    path = files["photos"][0]
    with Image.open(path) as im:
        pil = im.convert("RGB")
    from_path = rcdm.encode(path)
    torch.testing.assert_close(rcdm.encode(pil), from_path)
    torch.testing.assert_close(rcdm.encode([pil, files["photos"][1]])[0], from_path[0])
    torch.testing.assert_close(rcdm.encode(encoder_input(path)), from_path)
    torch.manual_seed(1)
    out = rcdm([pil, path], num_samples=2)
    assert out.shape == (4, 3, 32, 32)


def test_interpolate_and_manipulate_take_images(rcdm, files):
    a_path, b_path, c_path = files["photos"]
    torch.manual_seed(0)
    out = rcdm.interpolate(a_path, b_path, num_points=3, methods=["linear"])
    a, b = rcdm.encode([a_path, b_path])
    torch.testing.assert_close(out["features"][0, 0], a)
    torch.testing.assert_close(out["features"][0, -1], b)
    # a folder of neighbours, read and encoded like a list of their paths
    folder = files["root"] / "photos"
    by_folder = rcdm.manipulate(a_path, c_path, str(folder), n_neighbors=3, n_common=2, num_samples=1)
    feats = rcdm.encode(files["photos"])
    by_feats = rcdm.manipulate(feats[0], feats[2], feats, n_neighbors=3, n_common=2, num_samples=1)
    assert torch.equal(by_folder["dims"], by_feats["dims"])
    torch.testing.assert_close(by_folder["features"], by_feats["features"])


def test_keyword_mistakes_are_named(files):
    with pytest.raises(UsageError, match="`sampler` 'euler': choose one of"):
        RCDM.from_checkpoint(files["ckpt"], sampler="euler", progress=False)
    with pytest.raises(UsageError, match="`steps` must be at least 1"):
        RCDM.from_checkpoint(files["ckpt"], steps=0, progress=False)
    with pytest.raises(UsageError, match="no such file"):
        RCDM.from_checkpoint(files["root"] / "missing.pt")
    with pytest.raises(UsageError, match="from_pretrained"):
        RCDM.from_checkpoint("")


def test_the_library_path_does_not_parse_flags(files, monkeypatch):
    import argparse as argparse_module

    def refuse(*args, **kwargs):
        raise AssertionError("argparse was used")

    monkeypatch.setattr(argparse_module.ArgumentParser, "parse_args", refuse)
    monkeypatch.setattr(argparse_module.ArgumentParser, "parse_known_args", refuse)
    RCDM.from_checkpoint(files["ckpt"], timestep_respacing="2", progress=False)
    RCDM(model_path=files["ckpt"], timestep_respacing="2", progress=False)  # the original's form too
