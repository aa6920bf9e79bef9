"""Published RCDM checkpoints: URLs, download through the mirror, strict fit with the 128x128 model
(built on the meta device: 422.6M parameters are never allocated), and `--model_path` files."""

from __future__ import annotations

import json
import os

import pytest
import torch

from guided_diffusion_rcdm.config import ModelConfig
from guided_diffusion_rcdm import get_rcdm_models as rcdm
from guided_diffusion_rcdm import hub
from guided_diffusion_rcdm.encoders import EncoderSpec
from guided_diffusion_rcdm.script_util import (
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from helpers_hub import REFERENCE_DIR, closed_port_url, serve_directory, write_rcdm_file

REFERENCE = json.loads((REFERENCE_DIR / "pretrained_128_keys.json").read_text())


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(hub.MIRROR_ENV, raising=False)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def meta_model(meta: dict) -> torch.nn.Module:
    flags = {**model_and_diffusion_defaults(), **meta["model_flags"]}
    with torch.device("meta"):
        model, _ = create_model_and_diffusion(**flags, G_shared=False)
    return model


def test_the_nine_published_urls():
    urls = {rcdm.rcdm_checkpoint_url(m, h) for m in ("simclr", "barlow", "vicreg", "dino")
            for h in (False, True)} | {rcdm.rcdm_checkpoint_url("supervised")}
    expected = {f"https://dl.fbaipublicfiles.com/rcdm/rcdm_ema_{m}_{k}.pt"
                for m in ("simclr", "barlow", "vicreg", "dino") for k in ("trunk", "head")}
    assert urls == expected | {"https://dl.fbaipublicfiles.com/rcdm/rcdm_ema_supervised.pt"}
    assert urls <= set(hub.PUBLISHED_SHA256)
    with pytest.raises(ValueError, match="dino, simclr, barlow, vicreg, supervised"):
        rcdm.get_dict_rcdm_model("swav")


def test_published_meta_matches_the_reference():
    # the original's flags, the rest at their defaults: the same configuration
    assert ModelConfig(**rcdm.MODEL_FLAGS_128) == ModelConfig(**REFERENCE["flags"])
    for name in ("simclr", "barlow", "vicreg", "dino"):
        head = rcdm.published_meta(name, True)["model_flags"]["ssl_dim"]
        trunk = rcdm.published_meta(name, False)["model_flags"]["ssl_dim"]
        dims = REFERENCE["ssl_dims"]
        assert (head, trunk) == (dims[f"{name}_head"], dims["trunk"])


def test_published_checkpoint_through_the_mirror_fits_the_model(tmp_path, torch_home, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    written = write_rcdm_file(mirror / "rcdm_ema_dino_head.pt", "dino_head")
    with serve_directory(mirror) as base_url:
        monkeypatch.setenv(hub.MIRROR_ENV, base_url)
        sd = rcdm.get_dict_rcdm_model("dino", use_head=True)
    assert (torch_home / "rcdm_ema_dino_head.pt").is_file()
    assert list(sd) == list(REFERENCE["state_dict"])
    assert all(torch.equal(sd[k], written[k]) for k in written)
    assert list(sd["ssl_emb.weight"].shape) == [1024, 256]

    meta = rcdm.published_meta("dino", use_head=True)
    model = meta_model(meta)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == REFERENCE["num_params"] - (2048 - 256) * 1024  # ssl_emb is 256 wide here
    hub.load_state_dict_checked(model, sd, meta)  # strict: every key and shape fits
    assert torch.equal(model.ssl_emb.weight, written["ssl_emb.weight"])  # meta: tensors taken

    # The trunk's flags (ssl_dim 2048) do not fit the head checkpoint: a short, pointed message.
    with pytest.raises(hub.CheckpointMismatchError) as err:
        hub.load_state_dict_checked(meta_model(rcdm.published_meta("dino")), sd, meta)
    message = str(err.value)
    assert "1 tensors of another shape, 0 missing" in message
    assert "ssl_emb.weight: checkpoint [1024, 256], model [1024, 2048]" in message
    assert "check `type_model` and `use_head`" in message
    assert "`image_size` 128 " in message and "`learn_sigma` True " in message


def test_wrong_flags_against_a_published_layout(tmp_path):
    sd = write_rcdm_file(tmp_path / "rcdm_ema_supervised.pt", "trunk")
    meta = {"model_flags": {**rcdm.MODEL_FLAGS_128, "num_channels": 128, "feat_cond": True,
                            "ssl_dim": 2048}}
    with pytest.raises(hub.CheckpointMismatchError) as err:
        hub.load_state_dict_checked(meta_model(meta), sd)
    message = str(err.value)
    assert "time_embed.0.weight: checkpoint [1024, 256], model [512, 128]" in message
    assert "does not record its flags" in message and "$MODEL_FLAGS_128" in message
    assert len(message.splitlines()) < 12


def test_model_path_files(tmp_path, torch_home, monkeypatch):
    monkeypatch.setenv(hub.MIRROR_ENV, closed_port_url())  # --model_path needs no network
    sd = {"ssl_emb.weight": torch.randn(8, 4), "out.2.bias": torch.randn(3)}
    meta = {"model_flags": {"image_size": 64, "feat_cond": True, "ssl_dim": 4},
            "encoder": {"type_model": "resnet18", "use_head": False, "normalize": "imagenet"},
            "step": 10}
    torch.save(sd, tmp_path / "plain.pt")
    hub.save_checkpoint(tmp_path / "own.pt", sd, meta=meta)
    hub.save_checkpoint(tmp_path / "own.safetensors", sd, meta=meta)
    assert rcdm.load_rcdm_checkpoint(str(tmp_path / "plain.pt"))[1] == {}
    for name in ("own.pt", "own.safetensors"):
        loaded, loaded_meta = rcdm.load_rcdm_checkpoint(str(tmp_path / name))
        assert loaded_meta == meta and all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_a_served_checkpoint_that_runs_code_is_refused(tmp_path, torch_home, monkeypatch):
    class RunsCode:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "pwned"),))

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    torch.save({"x": RunsCode()}, mirror / "rcdm_ema_simclr_trunk.pt")
    with serve_directory(mirror) as base_url:
        monkeypatch.setenv(hub.MIRROR_ENV, base_url)
        with pytest.raises(hub.UnsafeCheckpointError, match="weights_only") as err:
            rcdm.get_dict_rcdm_model("simclr")
    assert not (tmp_path / "pwned").exists()
    assert "nothing was cached" in str(err.value) and "weights_only=False" not in str(err.value)
    assert not (torch_home / "rcdm_ema_simclr_trunk.pt").exists()


def test_a_corrupt_download_says_to_delete_it(tmp_path, torch_home, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "rcdm_ema_vicreg_trunk.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with serve_directory(mirror) as base_url:
        monkeypatch.setenv(hub.MIRROR_ENV, base_url)
        with pytest.raises(hub.DownloadError) as err:
            rcdm.get_dict_rcdm_model("vicreg")
    message = str(err.value)  # refused before it could enter the cache: nothing to delete by hand
    assert "rcdm_ema_vicreg_trunk.pt is not the expected checkpoint" in message
    assert "truncated or corrupt" in message and "nothing was cached" in message
    assert not (torch_home / "rcdm_ema_vicreg_trunk.pt").exists()
    # a corrupt file placed in the cache by hand is named, with what to do
    torch_home.mkdir(parents=True, exist_ok=True)
    (torch_home / "rcdm_ema_vicreg_trunk.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(hub.CheckpointError, match="delete it"):
        rcdm.get_dict_rcdm_model("vicreg")


def test_from_pretrained_builds_the_published_model_through_the_mirror(tmp_path, torch_home, monkeypatch):
    from guided_diffusion_rcdm.RCDM import RCDM

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    written = write_rcdm_file(mirror / "rcdm_ema_dino_head.pt", "dino_head")
    monkeypatch.setenv(hub.MIRROR_ENV, str(mirror))  # a directory mirror: no network at all
    model = RCDM.from_pretrained("dino", use_head=True, pretrained_encoder=False, sampler="ddim", steps=5,
                                 device="cpu", progress=False)
    assert model.image_size == 128 and model.ssl_dim == 256 and model.sampler == "ddim"
    assert model.encoder_spec == EncoderSpec("dino", use_head=True, input_normalize="minus_one_one",
                                             input_size=224, pretrained=False)
    assert model.encoder_info["type_model"] == "dino" and model.encoder_info["width"] == 256
    assert torch.equal(model.rcdm_model.ssl_emb.weight, written["ssl_emb.weight"])
