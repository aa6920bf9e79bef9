"""Encoders: each published layout, served over real HTTP through RCDM_MIRROR, arrives intact."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision

from guided_diffusion_rcdm import get_ssl_models as ssl
from guided_diffusion_rcdm import hub
from guided_diffusion_rcdm.get_ssl_models import get_model, representation_dim
from helpers_hub import closed_port_url, serve_directory, sha256, write_upstream_file

CASES = [("dino", False), ("dino", True), ("simclr", False), ("simclr", True),
         ("barlow", False), ("barlow", True), ("vicreg", False), ("vicreg", True),
         ("supervised", False)]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """One upstream-layout file per encoder, served from 127.0.0.1."""
    directory = tmp_path_factory.mktemp("mirror")
    files = {name: write_upstream_file(name, directory, seed=i)
             for i, name in enumerate(ssl.ENCODER_NAMES)}
    with serve_directory(directory) as base_url:
        yield base_url, files


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(hub.MIRROR_ENV, raising=False)
    return tmp_path / "torch_home"


def _assert_same(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = module.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


@pytest.mark.parametrize("name,use_head", CASES)
def test_published_encoder_from_mirror(name, use_head, upstream, torch_home, monkeypatch):
    base_url, files = upstream
    path, trunk, head = files[name]
    monkeypatch.setenv(hub.MIRROR_ENV, base_url)
    # Record the served file's digest as if it were the published one: verification runs too.
    monkeypatch.setitem(hub.PUBLISHED_SHA256, ssl.SSL_URLS[name], sha256(path))

    encoder = get_model(name, use_head=use_head)

    _assert_same(encoder.model, trunk)
    if use_head:
        _assert_same(encoder.head, head)
    else:
        assert encoder.head is None
    expected_dim = ssl.HEAD_DIMS[name] if use_head else 2048
    assert representation_dim(encoder) == expected_dim
    assert not encoder.training
    assert all(not p.requires_grad for p in encoder.parameters())
    # It went through the cache, under the URL's file name.
    assert (torch_home / "hub" / "checkpoints" / path.name).is_file()


def test_encoder_stays_frozen_and_matches_a_manual_forward(upstream, torch_home, monkeypatch):
    base_url, files = upstream
    monkeypatch.setenv(hub.MIRROR_ENV, base_url)
    encoder = get_model("simclr", use_head=True)
    encoder.train()  # e.g. a parent module switched to training: BN statistics must not move
    assert not encoder.training and not encoder.model.bn1.training
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        out = encoder(x)
        trunk = torchvision.models.resnet50()
        trunk.fc = torch.nn.Identity()
        trunk.load_state_dict(files["simclr"][1])
        feats = trunk.eval()(x)
        h = files["simclr"][2]
        ref = torch.relu(feats @ h["0.weight"].T + h["0.bias"]) @ h["2.weight"].T + h["2.bias"]
    assert out.shape == (2, 128)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_supervised_head_is_ignored_with_a_warning(upstream, torch_home, monkeypatch):
    base_url, files = upstream
    monkeypatch.setenv(hub.MIRROR_ENV, base_url)
    monkeypatch.setitem(hub.PUBLISHED_SHA256, ssl.SSL_URLS["supervised"],
                        sha256(files["supervised"][0]))
    with pytest.warns(UserWarning, match="no projector head"):
        encoder = get_model("supervised", use_head=True)
    assert encoder.head is None and representation_dim(encoder) == 2048


def test_torchvision_file_name_hash_is_checked(upstream, torch_home, monkeypatch):
    # With no digest recorded, torchvision's file-name prefix (0676ba61) is the checksum: our random
    # file under that name must be refused, and nothing may stay in the cache.
    base_url, _ = upstream
    monkeypatch.setenv(hub.MIRROR_ENV, base_url)
    with pytest.raises(hub.ChecksumError, match="0676ba61"):
        get_model("supervised")
    cache = torch_home / "hub" / "checkpoints"
    assert not cache.exists() or not any(cache.iterdir())


def test_wrong_shapes_in_an_upstream_file_name_the_key(tmp_path, torch_home, monkeypatch):
    path, _, _ = write_upstream_file("simclr", tmp_path)
    obj = torch.load(path, weights_only=False)
    heads = obj["classy_state_dict"]["base_model"]["model"]["heads"]
    heads["1.clf.0.weight"] = torch.randn(256, 2048)
    heads["1.clf.0.bias"] = torch.randn(256)
    torch.save(obj, path)
    monkeypatch.setenv(hub.MIRROR_ENV, str(tmp_path))  # a directory mirror
    with pytest.raises(hub.DownloadError) as err:  # refused before it is used (or cached)
        get_model("simclr", use_head=True)
    message = str(err.value)
    assert message.startswith(f"{path} is not the expected checkpoint (the simclr head does not fit")
    assert "2.weight: file [256, 2048], model [128, 2048]" in message
    assert len(message.splitlines()) == 1


def test_wrong_nesting_is_a_clear_error(tmp_path, torch_home, monkeypatch):
    torch.save({"model": {"conv1.weight": torch.zeros(1)}}, tmp_path / "resnet50_fullckpt.pth")
    (tmp_path / "dino_resnet50_pretrain_full_checkpoint.pth").write_bytes(
        (tmp_path / "resnet50_fullckpt.pth").read_bytes())
    monkeypatch.setenv(hub.MIRROR_ENV, str(tmp_path))
    with pytest.raises(hub.DownloadError, match=r"not a DINO checkpoint: expected \['teacher'\]"):
        get_model("dino")


def test_random_init_needs_no_network(torch_home, monkeypatch):
    monkeypatch.setenv(hub.MIRROR_ENV, closed_port_url())
    a = get_model("dino", use_head=True, pretrained=False)
    b = get_model("dino", use_head=True, pretrained=False)
    assert representation_dim(a) == 256
    assert torch.equal(a.head.mlp[0].weight, b.head.mlp[0].weight)  # fixed seed
    assert all(not p.requires_grad for p in a.parameters()) and not a.training
    assert not (torch_home / "hub").exists()


def test_torchvision_model_by_name_through_the_mirror(tmp_path, torch_home, monkeypatch):
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    file_name = weights.url.rsplit("/", 1)[1]
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / file_name)
    monkeypatch.setitem(hub.PUBLISHED_SHA256, weights.url, sha256(tmp_path / file_name))
    with serve_directory(tmp_path) as base_url:
        monkeypatch.setenv(hub.MIRROR_ENV, base_url)
        encoder = get_model("resnet18")
    assert representation_dim(encoder) == 512  # measured: pooled features before fc
    assert encoder.input_normalize == "imagenet"
    x = torch.rand(1, 3, 224, 224)
    reference.fc = torch.nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), reference.eval()(x))


def test_local_files_upstream_layout_and_torchvision_state_dict(tmp_path, torch_home, monkeypatch):
    monkeypatch.setenv(hub.MIRROR_ENV, closed_port_url())  # a local file needs no download
    # DINO's unused last layer stored plain this time (weight-normed in the served file).
    path, trunk, head = write_upstream_file("dino", tmp_path, dino_weight_norm=False)
    encoder = get_model(str(path), use_head=True)
    _assert_same(encoder.model, trunk)
    _assert_same(encoder.head, head)
    assert representation_dim(encoder) == 256

    sd = torchvision.models.resnet18(num_classes=1000).state_dict()
    torch.save(sd, tmp_path / "my_resnet.pth")
    encoder = get_model(str(tmp_path / "my_resnet.pth"))
    assert representation_dim(encoder) == 512
    assert torch.equal(encoder.model.conv1.weight, sd["conv1.weight"])


def test_each_encoder_has_its_own_input_scaling(tmp_path, torch_home, monkeypatch):
    # The published ResNet-50s (supervised included) are fed [-1, 1], as the original fed them and
    # the published RCDM checkpoints were trained; torchvision models the ImageNet mean/std their
    # weights were trained with. The encoder built says the same as the name alone.
    monkeypatch.setenv(hub.MIRROR_ENV, closed_port_url())
    for name in ssl.ENCODER_NAMES:
        assert ssl.native_input_normalize(name) == "minus_one_one"
        assert get_model(name, pretrained=False).input_normalize == "minus_one_one"
    for name in ("resnet18", "ResNet18", "mobilenet_v3_small"):
        assert ssl.native_input_normalize(name) == "imagenet"
    assert get_model("resnet18", pretrained=False).input_normalize == "imagenet"
    path, _, _ = write_upstream_file("dino", tmp_path)
    assert ssl.native_input_normalize(str(path)) == "minus_one_one" == get_model(str(path)).input_normalize
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "plain.pth")
    assert ssl.native_input_normalize(str(tmp_path / "plain.pth")) == "imagenet"
    hub.save_checkpoint(tmp_path / "recorded.pt", torchvision.models.resnet18().state_dict(),
                        meta={"arch": "resnet18", "normalize": "minus_one_one"})
    assert ssl.native_input_normalize(str(tmp_path / "recorded.pt")) == "minus_one_one"
    assert get_model(str(tmp_path / "recorded.pt")).input_normalize == "minus_one_one"


def test_unknown_type_model_lists_the_valid_names():
    with pytest.raises(ValueError) as err:
        get_model("mocov3")
    message = str(err.value)
    for name in (*ssl.ENCODER_NAMES, "resnet18", "vit_b_16"):
        assert name in message
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        get_model("/nonexistent/encoder.pth")


def test_strip_classifier_gives_pooled_features():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, dim in (("squeezenet1_1", 512), ("mobilenet_v3_small", 1024)):
            model = ssl.strip_classifier(torchvision.models.get_model(name))
            assert representation_dim(ssl.FrozenEncoder(model)) == dim
