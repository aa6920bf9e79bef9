"""`rcdm explore`: the app served on 127.0.0.1 with a tiny checkpoint, driven through Gradio's own
client (each tab's images, the same seed's same images, bad inputs answered in the page while the
server keeps serving) and through a real browser (headless Chromium with Playwright)."""

from __future__ import annotations

import os
import struct
import sys
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio", reason="the app's extra: pip install -e '.[app]'")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

import _explore_browser  # noqa: E402
from _sampling_helpers import TINY_FLAGS, make_tiny_checkpoint, write_photos  # noqa: E402
from guided_diffusion_rcdm.__main__ import main as rcdm_main  # noqa: E402
from guided_diffusion_rcdm.apps import explore  # noqa: E402

SIZE = TINY_FLAGS["image_size"]
STEPS = 3
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("explore")
    bad = root / "bad"
    bad.mkdir()
    (bad / "notes.png").write_text("these are notes, not an image\n")
    (bad / "notes.txt").write_text("these are notes, not an image\n")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(bad / "dot.png")
    (bad / "huge.png").write_bytes(png_header(20000, 20000))
    (root / "empty").mkdir()
    (root / "not_a_checkpoint.pt").write_bytes(b"not a checkpoint")
    return {
        "root": root,
        "ckpt": make_tiny_checkpoint(root / "tiny.pt"),
        "photos": write_photos(root / "photos", names=PHOTOS),
        "bad": bad,
    }


def png_header(width: int, height: int) -> bytes:
    """A PNG file that declares width x height pixels and holds one empty row: cheap to write, and
    PIL refuses it at open (decompression-bomb limit) before decoding anything."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def server(files):
    explorer = explore.open_explorer(files["ckpt"], images=str(files["root"] / "photos"), sampler="ddim",
                                     steps=STEPS)
    srv = explore.Server(explorer, "127.0.0.1", explore._free_port())
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server, files):
    return Client(server.url, verbose=False, download_files=str(files["root"] / "downloads"))


def names(files) -> list[str]:
    return [Path(p).name for p in files["photos"]]


def images_of(gallery) -> list[np.ndarray]:
    return [np.asarray(Image.open(item["image"]).convert("RGB")) for item in gallery]


def samples(client, files, seed=1, k=3, **kw):
    args = dict(pick=names(files)[0], upload=None, num_samples=k, sampler="ddim", steps=STEPS, seed=seed,
                guidance_scale=1.0)
    return client.predict(**{**args, **kw}, api_name="/samples")


def serving(server) -> bool:
    with urllib.request.urlopen(server.url + "config", timeout=10) as r:
        return r.status == 200


# ----------------------------------------------------------------------------- the tabs


def test_samples_tab_gives_k_samples_and_the_same_seed_the_same_images(client, files, server):
    image, gallery, grid, settings = samples(client, files, seed=1, k=3)
    assert Image.open(image).size == (SIZE, SIZE)  # the conditioning image, as the model sees it
    first = images_of(gallery)
    assert len(first) == 3 and all(a.shape == (SIZE, SIZE, 3) for a in first)
    assert not np.array_equal(first[0], first[1])  # K different samples, not one repeated
    # the download: one row, the image then its samples
    assert Image.open(grid).size == (4 * (SIZE + 2) + 2, SIZE + 4)
    assert settings["seed"] == 1 and settings["steps"] == STEPS and settings["image"] == names(files)[0]
    again = images_of(samples(client, files, seed=1, k=3)[1])
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    other = images_of(samples(client, files, seed=2, k=3)[1])
    assert not np.array_equal(first[0], other[0])


def test_an_uploaded_image_is_sampled_from_its_own_representation(client, files, server):
    by_upload = images_of(samples(client, files, k=2, pick=None, upload=handle_file(files["photos"][1]))[1])
    by_pick = images_of(samples(client, files, k=2, pick=names(files)[1])[1])
    assert all(np.array_equal(a, b) for a, b in zip(by_upload, by_pick))
    # the upload was kept in the app's own temporary folder
    kept = list((server.explorer.tmp / "uploads").rglob(Path(files["photos"][1]).name))
    assert kept, "the upload is not in the app's temporary folder"


def test_interpolation_tab_gives_every_point_of_both_paths(client, files):
    a, b = names(files)[:2]
    gallery, _, point, grid, settings = client.predict(
        pick_a=a, upload_a=None, pick_b=b, upload_b=None, methods=["linear", "spherical"], num_points=4,
        sampler="ddim", steps=STEPS, seed=0, api_name="/interpolate")
    got = images_of(gallery)
    assert len(got) == 8 and all(x.shape == (SIZE, SIZE, 3) for x in got)
    assert [g["caption"] for g in gallery][:4] == ["linear α=0.00", "linear α=0.33", "linear α=0.67", "linear α=1.00"]
    # shared noise: both paths start at the same representation, so their first samples agree
    assert np.abs(got[0].astype(int) - got[4].astype(int)).max() <= 1
    assert len(point) == 2 and settings["points"] == 4
    assert Image.open(grid).size == (6 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2)


def test_manipulation_tab_gives_three_rows_of_k(client, files):
    a, b = names(files)[:2]
    gallery, grid, settings = client.predict(
        pick_s=a, upload_s=None, pick_t=b, upload_t=None, folder=str(files["root"] / "photos"), n_neighbors=3,
        n_common=1, num_samples=2, sampler="ddim", steps=STEPS, seed=0, api_name="/manipulate")
    got = images_of(gallery)
    assert len(got) == 6 and all(x.shape == (SIZE, SIZE, 3) for x in got)
    assert 0 <= settings["shared_dims"] <= settings["ssl_dim"]
    assert Image.open(grid).size == (3 * (SIZE + 2) + 2, 3 * (SIZE + 2) + 2)


def test_fidelity_tab_scores_the_images_on_screen_against_the_shuffled_control(client, files):
    picks = names(files)[:3]
    grid, per_image, scores, _, settings = client.predict(picks=picks, num_samples=2, sampler="ddim", steps=STEPS,
                                                         seed=0, api_name="/fidelity")
    assert Image.open(grid).size == (3 * (SIZE + 2) + 2, 3 * (SIZE + 2) + 2)
    assert [row[0] for row in per_image["data"]] == picks
    assert all(1 <= row[1] <= 3 for row in per_image["data"])
    rows = {row[0]: row[1:] for row in scores["data"]}
    assert rows["mean rank (lower is better)"][2] == 2.0  # chance among 3: (3 + 1) / 2
    assert "shuffled" in settings["summary"]


def test_sampling_jobs_wait_in_one_queue_per_model(server):
    sampling = {"samples", "interpolate", "manipulate", "fidelity", "load_model"}
    fns = [fn for fn in server.app.fns.values() if fn.api_name in sampling]
    assert {fn.api_name for fn in fns} == sampling
    assert {(fn.concurrency_id, fn.concurrency_limit) for fn in fns} == {("model", 1)}


def test_configure_sampling_checks_and_keeps_the_settings_on_a_mistake(server):
    rcdm = server.explorer.rcdm
    before = (rcdm.sampler, rcdm.sampling.steps, rcdm.sampling.guidance_scale)
    for bad in (dict(sampler="euler"), dict(steps=0), dict(guidance_scale=2.0)):  # no null representation
        with pytest.raises(explore.UsageError):
            rcdm.configure_sampling(**bad)
        assert (rcdm.sampler, rcdm.sampling.steps, rcdm.sampling.guidance_scale) == before
    assert rcdm.configure_sampling(sampler="dpm++", steps=2).sampler == "dpm++" and rcdm.sampling.steps == 2
    rcdm.configure_sampling(sampler=before[0], steps=before[1])


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("name, message", [
    ("notes.png", "not an image"),
    ("notes.txt", "Invalid file type"),  # refused by the upload box itself
    ("dot.png", "1x1 pixels is too small"),
    ("huge.png", "20000x20000 pixels is more than this app decodes|ImageTooLargeError"),
])
def test_a_bad_upload_is_answered_in_the_page_and_the_server_serves_on(client, files, server, name, message):
    with pytest.raises(AppError, match=message):
        samples(client, files, pick=None, upload=handle_file(str(files["bad"] / name)))
    assert serving(server)


def test_a_neighbour_folder_without_images_is_answered_in_the_page(client, files, server):
    a, b = names(files)[:2]
    for folder, message in ((files["root"] / "empty", "holds no images"), (files["root"] / "nowhere", "no such folder")):
        with pytest.raises(AppError, match=message):
            client.predict(pick_s=a, upload_s=None, pick_t=b, upload_t=None, folder=str(folder), n_neighbors=3,
                           n_common=1, num_samples=1, sampler="ddim", steps=STEPS, seed=0, api_name="/manipulate")
    assert serving(server)


def test_a_checkpoint_that_does_not_load_keeps_the_current_model(client, files, server):
    before = server.explorer.model_label
    for path in (files["root"] / "not_a_checkpoint.pt", files["root"] / "missing.pt"):
        with pytest.raises(AppError):
            client.predict(checkpoint=str(path), api_name="/load_model")
    assert server.explorer.model_label == before
    assert len(samples(client, files, k=1)[1]) == 1  # still sampling with the model it had


def test_the_command_line_says_a_mistake_in_one_line(files, capsys):
    cases = [
        (["--model_path", str(files["root"] / "not_a_checkpoint.pt")], "not_a_checkpoint.pt"),
        (["--model_path", files["ckpt"], "--images", str(files["root"] / "empty")], "--images"),
        (["--model_path", files["ckpt"], "--port", "70000"], "--port"),
    ]
    for argv, named in cases:
        assert rcdm_main(["explore", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("rcdm explore: error:") and named in err[0], err


def test_without_gradio_the_command_names_the_extra(monkeypatch, capsys, files):
    monkeypatch.setitem(sys.modules, "gradio", None)  # what an environment without gradio gives
    assert rcdm_main(["explore", "--model_path", files["ckpt"]]) == 2
    assert "pip install 'guided-diffusion-rcdm[app]'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- in a browser


def test_a_browser_uploads_a_photo_and_shows_the_samples(server, files, tmp_path):
    if not os.path.exists(_explore_browser.CHROMIUM):
        pytest.skip(f"no Chromium at {_explore_browser.CHROMIUM}: apt-get install -y chromium")
    pytest.importorskip("playwright", reason="pip install playwright")
    shot = tmp_path / "samples.png"
    widths = _explore_browser.upload_and_sample(server.url, files["photos"][2], shot, num_samples=4)
    assert len(widths) == 4 and all(w > 0 for w in widths), widths
    assert Image.open(shot).size[0] > 0


def test_closing_deletes_the_uploads_and_outputs(server, client, files):
    # Runs last (the module's tests run in file order): it stops the module's server.
    client.predict(pick=None, upload=handle_file(files["photos"][0]), num_samples=1, sampler="ddim", steps=STEPS,
                   seed=0, guidance_scale=1.0, api_name="/samples")
    tmp = server.explorer.tmp
    assert any((tmp / "uploads").rglob("*.jpg")) and any((tmp / "outputs").glob("*.png"))
    server.close()
    assert not tmp.exists()
