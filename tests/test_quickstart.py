"""scripts/quickstart.py end to end, as a newcomer runs it, with a tiny budget: offline, on the CPU,
the report and every image it references exist; a second run reuses the trained model; bad flags
fail before any work."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "quickstart.py"
# A tiny budget: 2 training steps, one crop per photo, 2 samples per view, 2 sampling steps. resnet18
# stands in for the ResNet-50 to keep the test short (same code path: an untrained torchvision net).
TINY = ["--train_steps", "2", "--crops_per_photo", "1", "--samples_per_image", "2", "--steps", "2",
        "--interpolation_points", "3", "--type_model", "resnet18", "--num_channels", "32", "--progress", "False"]


def _run(argv, env, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=240)


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory):
    """No published weights anywhere: an empty torch.hub cache and an empty offline mirror."""
    root = tmp_path_factory.mktemp("offline")
    (root / "mirror").mkdir()
    return {**os.environ, "TORCH_HOME": str(root / "torch"), "RCDM_MIRROR": str(root / "mirror"),
            "RCDM_STATS_CACHE": str(root / "stats")}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, offline_env):
    out = tmp_path_factory.mktemp("qs") / "report"
    proc = _run(["--out_dir", str(out), *TINY], offline_env, cwd=tmp_path_factory.mktemp("cwd"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def _referenced(html: str) -> list[str]:
    return re.findall(r'<img[^>]+src="([^"]+)"', html)


def test_report_exists_and_references_its_images(first_run):
    out, _ = first_run
    html = (out / "index.html").read_text(encoding="utf-8")
    refs = _referenced(html)
    expected = {"samples.jpeg", "interpolation.jpeg", "manipulation.jpeg", "loss_curve.svg", "training_views.jpeg"}
    assert expected <= set(refs)
    for ref in refs:
        assert not ref.startswith("data:") and not os.path.isabs(ref)  # files next to it, not inlined
        path = out / ref
        assert path.is_file() and path.stat().st_size > 0, ref
    from PIL import Image

    with Image.open(out / "samples.jpeg") as grid:  # 16 held-out views x (view + 2 samples) of 32 px
        assert grid.size == (3 * 34 + 2, 16 * 34 + 2)
    assert "<polyline" in (out / "loss_curve.svg").read_text()
    assert len(html) < 200_000  # a page, not inlined megabytes


def test_report_says_what_was_run_and_scored(first_run):
    out, proc = first_run
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "UNTRAINED resnet18" in html and "UNTRAINED resnet18" in proc.stdout  # said plainly, both places
    assert re.search(r"training on [12] CPU threads? \(a step's forward and backward: 1 thread \d+ ms", proc.stdout)
    assert "python scripts/quickstart.py --out_dir" in html and "--train_steps 2" in html
    for word in ("shuffled control", "mean reciprocal rank", "FID and IS were not computed", "Interpolation",
                 "Manipulation", "CC0"):
        assert word in html
    scores = json.loads((out / "scores.json").read_text())
    fid = scores["fidelity"]
    assert fid["num_conditions"] == 16 and fid["samples_per_condition"] == 2
    assert fid["chance"]["mrr"] == pytest.approx(sum(1 / r for r in range(1, 17)) / 16)
    assert 1 <= fid["model"]["mean_rank"] <= 16
    assert scores["training"]["steps"] == 2 and not scores["training"]["reused"]
    assert "representation fidelity: 16 conditioning images x 2 samples" in proc.stdout


def _offline_here(monkeypatch, offline_env) -> None:
    """This process gets the offline environment the quickstart's runs had."""
    for key in ("TORCH_HOME", "RCDM_MIRROR", "RCDM_STATS_CACHE"):
        monkeypatch.setenv(key, offline_env[key])


def test_samples_file_is_readable_by_image_eval(first_run, offline_env, monkeypatch, capsys):
    from guided_diffusion_rcdm.cli import evaluate

    out, _ = first_run
    with np.load(out / "samples.npz") as data:
        assert data["samples"].shape == (16, 2, 32, 32, 3) and data["features"].shape == (16, 512)
        assert not bool(data["encoder_pretrained"])
    _offline_here(monkeypatch, offline_env)
    # in this process (what scripts/image_eval.py calls): the file needs nothing but itself
    assert evaluate.main([str(out / "samples.npz"), "--progress", "False"]) == 0, capsys.readouterr().err
    again = json.loads((out / "samples_eval.json").read_text())["fidelity"]["model"]
    first = json.loads((out / "scores.json").read_text())["fidelity"]["model"]
    assert again["mrr"] == pytest.approx(first["mrr"], abs=0.05)


def test_second_run_reuses_the_trained_model(first_run, offline_env, tmp_path, monkeypatch, capsys):
    # in this process (what scripts/quickstart.py calls; the first run was the script itself)
    from guided_diffusion_rcdm.apps import quickstart

    out, _ = first_run
    model_dirs = sorted(p.name for p in out.iterdir() if p.name.startswith("model_"))
    _offline_here(monkeypatch, offline_env)
    monkeypatch.chdir(tmp_path)
    status = quickstart.main(["--out_dir", str(out), *TINY])
    stdout = capsys.readouterr().out
    assert status == 0, stdout[-3000:]
    assert "reusing the model trained earlier" in stdout and "training for" not in stdout
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("model_")) == model_dirs
    assert json.loads((out / "scores.json").read_text())["training"]["reused"] is True


def test_bad_flags_fail_before_any_work(tmp_path, offline_env, monkeypatch, capsys):
    # in this process (what scripts/quickstart.py calls): the mistakes stop it before any work
    from guided_diffusion_rcdm.apps import quickstart

    _offline_here(monkeypatch, offline_env)
    assert quickstart.main(["--out_dir", str(tmp_path / "x"), "--num_channels", "48"]) == 2
    assert "multiple of 32" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert quickstart.main(["--out_dir", str(tmp_path / "y"), "--encoder_weights", "published", "--type_model", "dino",
                            "--train_steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "error: could not download" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "y").exists()


def test_report_template_ships_with_the_package(tmp_path):
    """`pip install .` carries the report page: a wheel built from a copy of the sources holds it."""
    import shutil
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "MANIFEST.in", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "guided_diffusion_rcdm", src / "guided_diffusion_rcdm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert "guided_diffusion_rcdm/apps/quickstart_report.html" in names
    assert "guided_diffusion_rcdm/apps/quickstart.py" in names


def test_report_template_is_found_and_strict():
    """A missing field raises rather than leaving `$name` in the page (write_report fills them all: the
    end-to-end tests above), and the page is found through importlib.resources, as when installed."""
    from guided_diffusion_rcdm.apps import quickstart

    template = quickstart.report_template()
    fields = set(template.get_identifiers())
    assert {"score_rows", "fid_is", "command", "credit_rows"} <= fields
    with pytest.raises(KeyError):
        template.substitute({})


def test_with_the_network_auto_downloads_dino_s_resnet50_once(tmp_path, monkeypatch, capsys):
    """`--encoder_weights auto`, nothing on disk: when the network answers (here a URL RCDM_MIRROR on
    127.0.0.1 serving a random-weight file in DINO's layout), DINO's published ResNet-50 trunk file is
    downloaded once, verified, and is the encoder; when nothing answers, the untrained one as before."""
    import torch

    from guided_diffusion_rcdm import get_ssl_models, hub
    from guided_diffusion_rcdm.apps.quickstart import choose_encoder
    from helpers_hub import closed_port_url, layouts, random_state, serve_directory, sha256

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = get_ssl_models.TRUNK_URLS["dino"]
    served = tmp_path / "served"
    served.mkdir()
    trunk = random_state({k: s for k, s in layouts()["dino"]["keys"].items() if not k.startswith("head.")},
                         seed=3, big=1 << 16)
    torch.save(trunk, served / url.rsplit("/", 1)[1])  # DINO's backbone file: the trunk's state dict
    monkeypatch.setitem(hub.PUBLISHED_SHA256, url, sha256(served / url.rsplit("/", 1)[1]))

    monkeypatch.setenv(hub.MIRROR_ENV, closed_port_url())  # offline: today's behaviour and message
    spec, sentence = choose_encoder("auto", "auto")
    assert spec.pretrained is False and "an UNTRAINED dino network" in sentence and url in sentence

    with serve_directory(served) as base_url:
        monkeypatch.setenv(hub.MIRROR_ENV, base_url)
        spec, sentence = choose_encoder("auto", "auto")
    cached = hub.hub_cache_dir() / "dino_resnet50_pretrain.pth"
    assert "the network answers: downloading dino's published file once" in capsys.readouterr().out
    assert spec.to_dict() == {"type_model": "dino", "use_head": False, "normalize": "minus_one_one",
                              "input_size": 224, "pretrained": True, "pooling": ""}
    assert f"a ResNet-50 trained with dino (published weights, {cached})" in sentence
    assert sha256(cached) == sha256(served / cached.name)

    monkeypatch.setenv(hub.MIRROR_ENV, closed_port_url())  # the network gone: the cached file serves
    assert choose_encoder("auto", "auto") == (spec, sentence)
    encoder = spec.build()
    assert torch.equal(encoder.model.layer4[2].conv3.weight, trunk["layer4.2.conv3.weight"])


def test_the_run_ends_with_the_command_that_explores_its_model(first_run):
    out, proc = first_run
    last = proc.stdout.strip().splitlines()[-1]
    checkpoints = list(out.glob("model_*/ema_*.pt"))
    assert len(checkpoints) == 1 and "rcdm explore --model_path" in last and str(checkpoints[0]) in last, last


def test_the_quickstart_takes_a_library_encoder_and_its_weights_file(tmp_path):
    """`--type_model timm:NAME` (or hf:, open_clip:, py:) in the quickstart: the library's model,
    untrained on request or with a weights file; a weights file for a published encoder is refused."""
    from guided_diffusion_rcdm.apps.quickstart import choose_encoder
    from guided_diffusion_rcdm.errors import UsageError

    spec, sentence = choose_encoder("timm:resnet18", "untrained")
    assert spec.name == "timm:resnet18" and spec.pretrained is False and "untrained" in sentence
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"not read until the encoder is built")
    spec, sentence = choose_encoder("timm:resnet18", str(weights))
    assert spec.weights == str(weights) and str(weights) in sentence
    with pytest.raises(UsageError, match="--encoder_weights"):
        choose_encoder("dino", str(weights))
