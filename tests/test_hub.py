"""hub: downloads over a real local HTTP server, the cache, the mirror, checksums, safe loading,
atomic saving and the short mismatch message."""

from __future__ import annotations

import argparse
import hashlib
import os

import numpy as np
import pytest
import torch
from torch import nn

from guided_diffusion_rcdm import hub
from helpers_hub import closed_port_url, serve_directory

URL = "https://dl.fbaipublicfiles.com/rcdm/some_model.pt"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(hub.MIRROR_ENV, raising=False)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


@pytest.fixture
def served(tmp_path):
    """A directory with one checkpoint, served on 127.0.0.1; yields (dir, base URL, sd, sha)."""
    directory = tmp_path / "mirror"
    directory.mkdir()
    sd = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    torch.save(sd, directory / "some_model.pt")
    digest = hashlib.sha256((directory / "some_model.pt").read_bytes()).hexdigest()
    with serve_directory(directory, cut={"cut_model.pt"}) as base_url:
        yield directory, base_url, sd, digest


def _leftovers(cache_dir):
    return sorted(os.listdir(cache_dir)) if cache_dir.exists() else []


def test_download_through_url_mirror_into_the_cache(cache, served, monkeypatch):
    _, base_url, sd, digest = served
    monkeypatch.setenv(hub.MIRROR_ENV, base_url)
    path = hub.download(URL, sha256=digest, progress=False)
    assert path == cache / "some_model.pt"
    loaded, meta = hub.load_checkpoint(path)
    assert meta == {} and all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert _leftovers(cache) == ["some_model.pt"]

    # Once cached, the file is used with no network at all.
    monkeypatch.setenv(hub.MIRROR_ENV, closed_port_url())
    assert hub.download(URL, sha256=digest, progress=False) == path


def test_mirror_may_keep_the_url_path(cache, served, monkeypatch):
    directory, base_url, _, _ = served
    nested = directory / "rcdm" / "nested.pt"
    nested.parent.mkdir()
    nested.write_bytes((directory / "some_model.pt").read_bytes())
    monkeypatch.setenv(hub.MIRROR_ENV, base_url)
    path = hub.download("https://dl.fbaipublicfiles.com/rcdm/nested.pt", progress=False)
    assert path.read_bytes() == nested.read_bytes()


def test_directory_mirror_is_used_in_place(cache, served, monkeypatch):
    directory, _, _, digest = served
    monkeypatch.setenv(hub.MIRROR_ENV, str(directory))
    assert hub.download(URL, sha256=digest) == directory / "some_model.pt"
    assert _leftovers(cache) == []
    with pytest.raises(hub.ChecksumError, match="expected 0000"):
        hub.download(URL, sha256="0" * 64)


def test_file_placed_by_hand_in_the_cache(cache, monkeypatch):
    cache.mkdir(parents=True)
    torch.save({"w": torch.ones(2)}, cache / "some_model.pt")
    monkeypatch.setenv(hub.MIRROR_ENV, closed_port_url())
    sd, _ = hub.load_checkpoint(hub.download(URL))
    assert torch.equal(sd["w"], torch.ones(2))


def test_unreachable_url_says_what_to_do(cache, monkeypatch):
    url = closed_port_url() + "/weights/model.pt"
    with pytest.raises(hub.DownloadError) as err:
        hub.download(url, progress=False)
    message = str(err.value)
    assert url in message
    assert str(cache / "model.pt") in message
    assert hub.MIRROR_ENV in message
    assert _leftovers(cache) == []


def test_missing_from_mirror(cache, served, monkeypatch):
    _, base_url, _, _ = served
    monkeypatch.setenv(hub.MIRROR_ENV, base_url)
    with pytest.raises(hub.DownloadError, match="HTTP 404") as err:
        hub.download("https://example.org/absent.pt", progress=False)
    assert "https://example.org/absent.pt" in str(err.value)


def test_checksum_mismatch_leaves_nothing_in_the_cache(cache, served, monkeypatch):
    _, base_url, _, digest = served
    monkeypatch.setenv(hub.MIRROR_ENV, base_url)
    with pytest.raises(hub.ChecksumError) as err:
        hub.download(URL, sha256="f" * 64, progress=False)
    assert digest in str(err.value)
    assert _leftovers(cache) == []
    # A prefix (torchvision's file-name convention) is checked the same way.
    assert hub.download(URL, sha256=digest[:8], progress=False).is_file()


def test_recorded_checksum_is_used_by_default(cache, served, monkeypatch):
    _, base_url, _, digest = served
    monkeypatch.setenv(hub.MIRROR_ENV, base_url)
    monkeypatch.setitem(hub.PUBLISHED_SHA256, URL, "e" * 64)
    with pytest.raises(hub.ChecksumError):
        hub.download(URL, progress=False)
    monkeypatch.setitem(hub.PUBLISHED_SHA256, URL, digest)
    assert hub.download(URL, progress=False).is_file()
    # A cached file that has changed since is caught on the next use.
    (cache / "some_model.pt").write_bytes(b"changed")
    with pytest.raises(hub.ChecksumError, match="Delete it"):
        hub.download(URL, progress=False)


def test_dropped_transfer_leaves_nothing_in_the_cache(cache, served, monkeypatch):
    directory, base_url, _, _ = served
    (directory / "cut_model.pt").write_bytes((directory / "some_model.pt").read_bytes())
    monkeypatch.setenv(hub.MIRROR_ENV, base_url)
    with pytest.raises(hub.DownloadError, match="cut short"):
        hub.download("https://example.org/cut_model.pt", progress=False)
    assert _leftovers(cache) == []


def test_truncated_and_garbage_files_name_the_path(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(100, 100)}, good)
    for name, data in (("truncated.pt", good.read_bytes()[: good.stat().st_size // 2]),
                       ("garbage.pt", b"<html>Not Found</html>")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(hub.CheckpointError, match="truncated or corrupt") as err:
            hub.load_checkpoint(tmp_path / name)
        assert str(tmp_path / name) in str(err.value)
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        hub.load_checkpoint(tmp_path / "absent.pt")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": _RunsCode(str(marker))},
               tmp_path / "evil.pt")
    with pytest.raises(hub.UnsafeCheckpointError) as err:
        hub.load_checkpoint(tmp_path / "evil.pt")
    assert "mkdir" in str(err.value) and "weights_only" in str(err.value)
    assert not marker.exists()


def test_upstream_training_state_loads_safely(tmp_path):
    # What DINO / VISSL / VICReg files carry beside the weights.
    obj = {
        "model": {"w": torch.randn(3)},
        "args": argparse.Namespace(arch="resnet50", lr=0.3, crops=(0.05, 0.14)),
        "optimizer": {"state": {0: {"momentum_buffer": torch.randn(3)}},
                      "param_groups": [{"lr": np.float64(0.1), "params": [0]}]},
        "epoch": np.int64(1000), "loss": np.float32(1.5),
    }
    torch.save(obj, tmp_path / "full.pth")
    loaded = hub.safe_torch_load(tmp_path / "full.pth")
    assert loaded["args"].arch == "resnet50" and loaded["args"].crops == (0.05, 0.14)
    assert loaded["epoch"] == 1000 and loaded["loss"] == np.float32(1.5)
    assert torch.equal(loaded["model"]["w"], obj["model"]["w"])
    # Allowing those did not open the door to anything else.
    assert argparse.Namespace not in torch.serialization.get_safe_globals()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_and_load_with_meta(tmp_path, suffix):
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    meta = {"model_flags": {"image_size": 64, "num_channels": 128, "learn_sigma": True},
            "encoder": {"type_model": "dino", "use_head": False, "normalize": "minus_one_one"},
            "step": 1200}
    path = tmp_path / f"model{suffix}"
    hub.save_checkpoint(path, model.state_dict(), meta=meta)
    sd, loaded_meta = hub.load_checkpoint(path)
    assert loaded_meta == meta
    fresh = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    hub.load_state_dict_checked(fresh, sd, loaded_meta)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                  model.state_dict().values()))
    assert sorted(os.listdir(tmp_path)) == [path.name]


def test_safetensors_with_tied_weights(tmp_path):
    shared = torch.randn(3, 3)
    hub.save_checkpoint(tmp_path / "tied.safetensors", {"a": shared, "b": shared})
    sd, meta = hub.load_checkpoint(tmp_path / "tied.safetensors")
    assert torch.equal(sd["a"], sd["b"]) and meta == {}


def test_ddp_prefix_and_wrapped_state_dicts(tmp_path):
    torch.save({"module.w": torch.ones(1)}, tmp_path / "ddp.pt")
    torch.save({"state_dict": {"w": torch.ones(1)}, "epoch": 3}, tmp_path / "wrapped.pt")
    for name in ("ddp.pt", "wrapped.pt"):
        assert list(hub.load_checkpoint(tmp_path / name)[0]) == ["w"]
    torch.save({"epoch": 3}, tmp_path / "nothing.pt")
    with pytest.raises(hub.CheckpointError, match="does not hold a model state dict"):
        hub.load_checkpoint(tmp_path / "nothing.pt")


def test_atomic_save_never_leaves_a_truncated_file(tmp_path):
    path = tmp_path / "model.pt"
    hub.atomic_torch_save({"w": torch.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):
        hub.atomic_torch_save({"w": torch.zeros(2), "bad": lambda: None}, path)  # unpicklable
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]


def test_mismatch_message_is_short_and_names_the_flags():
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(20)])
    other = nn.Sequential(*[nn.Linear(8, 16) for _ in range(20)], nn.Linear(16, 16))
    meta = {"model_flags": {"image_size": 64, "num_channels": 128, "attention_resolutions": "16,8"}}
    with pytest.raises(ValueError) as err:
        hub.load_state_dict_checked(model, other.state_dict(), meta)
    message = str(err.value)
    assert "40 tensors of another shape, 0 missing from the checkpoint, 2 unexpected" in message
    assert "0.weight: checkpoint [16, 8], model [8, 8]" in message
    assert "unexpected 20.weight: checkpoint [16, 16]" in message
    assert ("saved with `image_size` 64 `num_channels` 128 `attention_resolutions` 16,8"
            in message)
    assert len(message.splitlines()) <= 14  # not a wall of 60 keys


def test_the_representation_width_is_blamed_only_when_it_differs():
    def with_ssl_emb(width_in, width_out):
        module = nn.Module()
        module.ssl_emb = nn.Linear(width_in, width_out)
        return module

    with pytest.raises(hub.CheckpointMismatchError) as err:  # another channel count, same ssl_dim
        hub.load_state_dict_checked(with_ssl_emb(512, 128), with_ssl_emb(512, 256).state_dict())
    assert "representation size" not in str(err.value)
    with pytest.raises(hub.CheckpointMismatchError) as err:
        hub.load_state_dict_checked(with_ssl_emb(2048, 128), with_ssl_emb(512, 128).state_dict())
    assert "checkpoint ssl_dim 512, model 2048" in str(err.value)


def test_missing_keys_and_strict_false():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    partial = {k: v for k, v in model.state_dict().items() if k.startswith("0.")}
    with pytest.raises(hub.CheckpointMismatchError, match="2 missing") as err:
        hub.load_state_dict_checked(model, partial)
    assert "does not record its flags" in str(err.value)
    hub.load_state_dict_checked(model, partial, strict=False)  # missing allowed, shapes fine
    partial["0.weight"] = torch.zeros(3, 2)
    with pytest.raises(hub.CheckpointMismatchError, match="0.weight: checkpoint \\[3, 2\\]"):
        hub.load_state_dict_checked(model, partial, strict=False)


# ----------------------------------------------------------------------------- verified downloads


def test_a_served_file_that_is_not_a_checkpoint_never_enters_the_cache(cache, served, monkeypatch):
    directory, base_url, _, _ = served
    (directory / "random.pt").write_bytes(os.urandom(5000))
    monkeypatch.setenv(hub.MIRROR_ENV, base_url)
    with pytest.raises(hub.DownloadError, match="is not the expected checkpoint") as err:
        hub.download("https://example.org/random.pt", progress=False)
    assert "nothing was cached" in str(err.value)
    assert _leftovers(cache) == []
    # the right format but not the expected layout: refused by the caller's check, not cached
    from guided_diffusion_rcdm.get_rcdm_models import check_rcdm_layout

    with pytest.raises(hub.DownloadError, match="not an RCDM checkpoint: no input_blocks.0.0.weight"):
        hub.download(URL, progress=False, verify=check_rcdm_layout)
    assert _leftovers(cache) == []


def test_pinned_digests_from_the_environment_or_a_sha256sums_file(cache, served, monkeypatch, tmp_path, capsys):
    _, base_url, _, digest = served
    monkeypatch.setenv(hub.MIRROR_ENV, base_url)
    assert hub.sha256_env_name("some_model.pt") == "RCDM_SHA256_SOME_MODEL"
    monkeypatch.setenv("RCDM_SHA256_SOME_MODEL", "a" * 64)
    with pytest.raises(hub.ChecksumError, match="expected aaaa"):
        hub.download(URL, progress=False)
    assert _leftovers(cache) == []
    monkeypatch.delenv("RCDM_SHA256_SOME_MODEL")
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"{'b' * 64}  other.pt\n{digest}  some_model.pt\n")
    monkeypatch.setenv(hub.SHA256SUMS_ENV, str(sums))
    umask = os.umask(0o022)
    try:
        path = hub.download(URL, progress=False)
    finally:
        os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o644  # readable by the group, like any file made here
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == f"weights {path} (sha256 {digest}, {path.stat().st_size} bytes): matches {sums}"
    # once cached, a changed pin catches the file on its next use
    sums.write_text(f"{'c' * 64}  some_model.pt\n")
    with pytest.raises(hub.ChecksumError, match=f"does not match {sums}"):
        hub.download(URL, progress=False)


def test_the_console_names_the_file_and_digest_and_how_to_pin_it(cache, served, monkeypatch, capsys):
    directory, base_url, _, digest = served
    monkeypatch.setenv(hub.MIRROR_ENV, str(directory))  # a directory mirror: used in place
    path = hub.download(URL, progress=False)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (f"weights {path} (sha256 {digest}, {path.stat().st_size} bytes): no published digest "
                    f"to check it against; to pin this file, set RCDM_SHA256_SOME_MODEL={digest}")
    monkeypatch.setenv("RCDM_SHA256_SOME_MODEL", digest)
    hub.download(URL, progress=False)
    assert capsys.readouterr().err.strip().endswith("matches RCDM_SHA256_SOME_MODEL")
