"""Every mistake gets one line and leaves nothing behind.

A table over every command (through `rcdm COMMAND`, and the submitit launcher) x every numeric
flag's bounds: the value just outside each end of the declared range (and NaN, infinity, text) is
refused with exactly one line `PROG: error: ...` naming the flag, exit status 2, no traceback, and
no file or folder created or changed anywhere under the test's folder; the value at each end is
accepted by the parser. Then the other bad inputs: files that are not what they claim (a
checkpoint of NaN weights, damaged sample files), an encoder flag that cannot apply, outputs
that are files, and hostile state files (in test_hostile_files.py).

The commands run in this process through their `main(argv)`: every case fails before any model
is built, in milliseconds.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _sampling_helpers import REPO, make_tiny_checkpoint, write_photos
from guided_diffusion_rcdm import __main__ as rcdm_command
from guided_diffusion_rcdm.apps import benchmark, quickstart
from guided_diffusion_rcdm.cli import cache, evaluate, sample, train
from guided_diffusion_rcdm.cli.flags import FLAGS
from guided_diffusion_rcdm.script_util import MODEL_FLAGS, Range

sys.path.insert(0, str(REPO))  # run_with_submitit.py
import run_with_submitit  # noqa: E402

PARSERS = {
    "train": train.create_argparser,
    "sample": sample.sample_argparser,
    "interpolate": sample.interpolate_argparser,
    "manipulate": sample.manipulate_argparser,
    "eval": evaluate.create_argparser,
    "cache": cache.create_argparser,
    "quickstart": quickstart.create_argparser,
    "benchmark": benchmark.create_argparser,
    "run_with_submitit.py": run_with_submitit.create_argparser,
}
LOCAL_FLAGS = {f.name: f for f in (*run_with_submitit.JOB_FLAGS, *quickstart.QUICKSTART_FLAGS,
                                   *benchmark.BENCHMARK_FLAGS)}


def _declared(name: str):
    return FLAGS.get(name) or LOCAL_FLAGS.get(name)


def _numeric_flags(command: str) -> list[tuple[str, object, Range | None]]:
    """`(name, type, range)` of each numeric (or ranged) flag the command's parser takes."""
    parser = PARSERS[command]()
    found = []
    for action in parser._actions:
        names = [o[2:] for o in action.option_strings if o.startswith("--")]
        if not names or action.help == argparse.SUPPRESS:
            continue
        flag = _declared(action.dest)
        if flag is None:
            continue
        if flag.type in (int, float) or flag.range is not None:
            found.append((names[0], flag.type, flag.range))
    return found


def test_every_numeric_flag_states_a_range():
    missing = {(command, name) for command in PARSERS for name, kind, rng in _numeric_flags(command)
               if rng is None}
    assert not missing, f"numeric flags without a declared range: {sorted(missing)}"
    assert all(f.range is not None for f in MODEL_FLAGS.values() if type(f.default) in (int, float))


def _step(kind) -> float:
    return 1 if kind is int else 1e-6


def _outside(kind, rng: Range) -> list[str]:
    """Values just outside each end of `rng`, and the non-numbers."""
    values = []
    if rng.low is not None:
        below = rng.low if rng.low_open else rng.low - _step(kind)
        if below not in rng.also:
            values.append(below)
        elif kind is int:
            values.append(min(rng.also) - 1)
    if rng.high is not None:
        values.append(rng.high if rng.high_open else rng.high + _step(kind))
    text = [repr(float(v)) if kind is not int else str(int(v)) for v in values]
    if kind is float:
        text += ["nan", "inf"]
    if kind is str:  # a comma-separated list of numbers (--ema_rate)
        text += ["abc", "0.5,x"]
    return text


def _inside(kind, rng: Range) -> list[str]:
    values = [v for v in (rng.low, rng.high) if v is not None]
    values = [v + (_step(kind) if v == rng.low and rng.low_open else 0) for v in values]
    values = [v - (_step(kind) if v == rng.high and rng.high_open else 0) for v in values]
    values += list(rng.also)
    return [repr(float(v)) if kind is not int else str(int(v)) for v in values]


def _bound_cases():
    for command in PARSERS:
        for name, kind, rng in _numeric_flags(command):
            if rng is None:
                continue
            for value in _outside(kind, rng):
                yield command, name, value


BOUND_CASES = list(_bound_cases())
OTHER_CASES: list = []  # filled below, counted in test_the_table_is_large


# ----------------------------------------------------------------------------- harness


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under `root`: its kind, size and modification time."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            state[path] = (st.st_mode >> 12, st.st_size if not os.path.isdir(path) else 0, st.st_mtime_ns)
    return state


def run_command(command: str, argv: list[str]) -> int:
    argv = list(map(str, argv))
    try:
        if command == "run_with_submitit.py":
            return run_with_submitit.main(argv)
        return rcdm_command.main([command, *argv])
    except SystemExit as exit_:  # the parser's own mistakes
        return exit_.code


def assert_refused(capsys, root: Path, command: str, argv: list, *expect: str) -> None:
    before = snapshot(root)
    status = run_command(command, argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    prog = command if command == "run_with_submitit.py" else f"rcdm {command}"
    assert status == 2, (command, argv, captured.err[-2000:])
    assert "Traceback" not in captured.err, (command, argv, captured.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), (command, argv, captured.err)
    assert all(text in lines[0] for text in expect), (command, argv, lines[0], expect)
    after = snapshot(root)
    assert after == before, (command, argv, "changed:", sorted(set(after.items()) ^ set(before.items())))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    photos = write_photos(root / "photos", ("astronaut", "coffee", "chelsea"))
    ckpt = make_tiny_checkpoint(root / "tiny.pt")
    good = root / "good.npz"
    np.savez(good, samples=np.zeros((2, 2, 16, 16, 3), np.uint8), features=np.ones((2, 8), np.float32))
    return {"root": root, "photos": photos, "folder": Path(photos[0]).parent, "ckpt": ckpt, "good": good,
            "work": root / "cwd"}


def _base_argv(command: str, world: dict) -> list:
    """Arguments that would otherwise be valid for `command` (outputs under the test's folder)."""
    out = world["root"] / "out"
    photos, folder = world["photos"], world["folder"]
    common_sampling = ["--model_path", world["ckpt"], "--device", "cpu", "--out_dir", out]
    return {
        "train": ["--data_dir", folder, "--out_dir", out, "--type_model", "resnet18", "--pretrained_encoder", "False"],
        "sample": [*common_sampling, "--data_dir", folder],
        "interpolate": [*common_sampling, "--first_image_path", photos[0], "--second_image_path", photos[1]],
        "manipulate": [*common_sampling, "--image_path", photos[0], "--image_target_path", photos[1],
                       "--folder_nn_path", folder],
        "eval": [world["good"], "--out_json", out / "scores.json"],
        "cache": ["--data_dir", folder, "--feat_cache", out],
        "quickstart": ["--out_dir", out],
        "benchmark": ["--out", out / "bench.json"],
        "run_with_submitit.py": ["--data_dir", folder, "--out_dir", out, "--local"],
    }[command]


@pytest.fixture(autouse=True)
def _in_work_folder(world, monkeypatch):
    world["work"].mkdir(exist_ok=True)
    monkeypatch.chdir(world["work"])  # a default output "." or relative path would show up in the snapshot
    monkeypatch.setenv("RCDM_CACHE_DIR", str(world["root"] / "cache"))


# ----------------------------------------------------------------------------- the bounds


def test_the_table_is_large():
    assert len(BOUND_CASES) > 150, len(BOUND_CASES)


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_a_value_outside_a_flags_range_is_one_line_and_writes_nothing(command, world, capsys):
    cases = [(name, value) for c, name, value in BOUND_CASES if c == command]
    assert cases, command
    for name, value in cases:
        assert_refused(capsys, world["root"], command, [*_base_argv(command, world), f"--{name}", value],
                       f"--{name}")


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_the_values_at_each_end_of_a_range_are_accepted(command):
    parser = PARSERS[command]()
    positional = ["samples.npz"] if command == "eval" else []
    for name, kind, rng in _numeric_flags(command):
        choices = next(a.choices for a in parser._actions if f"--{name}" in a.option_strings)
        for value in _inside(kind, rng):
            if choices and kind(value) not in choices:  # a command may narrow a flag's values
                continue
            args = parser.parse_args([*positional, f"--{name}", value])
            assert getattr(args, _declared_dest(parser, name)) == (value if kind is str else kind(value))


def _declared_dest(parser, name):
    return next(a.dest for a in parser._actions if f"--{name}" in a.option_strings)


def test_ranges_are_shown_by_help():
    text = " ".join(PARSERS["train"]().format_help().split())
    assert "[range: (0, 1)]" in text  # --ema_rate
    assert "[range: >= 1]" in text  # --log_interval


# ----------------------------------------------------------------------------- files that are not what they claim


def _bomb_png(path: Path, side: int = 20000) -> Path:
    """A PNG whose header says side x side pixels (PIL's decompression-bomb limit), a few bytes long."""
    import struct
    import zlib

    from PIL import Image

    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", side, side)
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr: ihdr + 17])))
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def files(world):
    root = world["root"] / "files"
    root.mkdir()
    (root / "a_file").write_text("x")
    nan_ckpt = root / "nan.pt"
    from guided_diffusion_rcdm import hub

    sd, meta = hub.load_checkpoint(world["ckpt"])
    sd = {k: (torch.full_like(v, float("nan")) if v.is_floating_point() else v) for k, v in sd.items()}
    hub.save_checkpoint(str(nan_ckpt), sd, meta=meta)
    (root / "nan_run").mkdir()  # a run whose newest checkpoint diverged: a rerun would resume from it
    (root / "nan_run" / "model000002.pt").write_bytes(nan_ckpt.read_bytes())
    (root / "text.pt").write_text("not a checkpoint")
    (root / "truncated.pt").write_bytes(Path(world["ckpt"]).read_bytes()[:1000])
    np.savez(root / "empty.npz")
    np.savez(root / "zero.npz", samples=np.zeros((0, 2, 16, 16, 3), np.uint8), features=np.zeros((0, 8), np.float32))
    np.savez(root / "zero_k.npz", samples=np.zeros((2, 0, 16, 16, 3), np.uint8), features=np.ones((2, 8), np.float32))
    (root / "truncated.npz").write_bytes(world["good"].read_bytes()[:300])
    np.savez(root / "object.npz", samples=np.array([None, "x"], dtype=object), features=np.ones((2, 8), np.float32))
    (root / "text.npz").write_text("not an npz")
    np.savez(root / "nan_features.npz", samples=np.zeros((2, 2, 16, 16, 3), np.uint8),
             features=np.full((2, 8), np.nan, np.float32))
    (root / "bombs").mkdir()
    _bomb_png(root / "bombs" / "bomb.png")
    return root


def _other_cases(world, files):
    f, w = files, world
    out = w["root"] / "out"
    folder, photos = w["folder"], w["photos"]
    tr = ["--data_dir", folder, "--out_dir", out, "--feat_cond", "--type_model", "resnet18",
          "--pretrained_encoder", "False"]
    smp = ["--device", "cpu", "--out_dir", out, "--data_dir", folder]
    interp = ["--model_path", w["ckpt"], "--device", "cpu", "--out_dir", out]
    yield "train", [*tr, "--schedule_sampler", "bogus"], ("--schedule_sampler",)
    yield "train", [*tr, "--use_head"], ("--use_head", "resnet18")
    yield "train", [*tr[:-3], "dinov2_vits14", "--pretrained_encoder", "False", "--use_head"], ("--use_head", "dinov2_vits14")
    yield "train", [*tr[:-3], "mae_vitb16", "--pretrained_encoder", "False", "--use_head"], ("--use_head", "mae_vitb16")
    yield "train", [*tr, "--feat_cache", f / "a_file"], ("--feat_cache",)
    yield "train", [*tr, "--feat_cache", f / "a_file" / "x"], ("--feat_cache",)
    yield "train", [*tr, "--resume_checkpoint", f / "missing.pt"], ("--resume_checkpoint",)
    yield "train", [*tr, "--resume_checkpoint", f / "nan.pt"], ("--resume_checkpoint", "nan.pt", "NaN")
    yield "train", [*tr, "--resume_checkpoint", f / "text.pt"], ("text.pt",)
    yield "train", [*tr[:2], "--out_dir", f / "nan_run", *tr[4:]], ("model000002.pt", "NaN")
    yield "train", [*tr[:2], "--out_dir", f / "a_file", *tr[4:]], ("--out_dir",)
    yield "train", [*tr[:2], "--out_dir", f / "a_file" / "x", *tr[4:]], ("--out_dir",)
    yield "train", ["--data_dir", f / "a_file", *tr[2:]], ("--data_dir",)
    yield "cache", ["--data_dir", folder, "--feat_cache", f / "a_file", "--type_model", "resnet18",
                    "--pretrained_encoder", "False"], ("--feat_cache",)
    yield "cache", ["--data_dir", folder, "--feat_cache", f / "a_file" / "x", "--type_model", "resnet18",
                    "--pretrained_encoder", "False"], ("--feat_cache",)
    yield "cache", ["--data_dir", folder, "--feat_cache", out, "--type_model", "resnet18", "--use_head"], ("--use_head",)
    yield "sample", [*smp, "--model_path", f / "nan.pt"], ("nan.pt", "NaN")
    yield "sample", [*smp, "--model_path", f / "text.pt"], ("text.pt",)
    yield "sample", [*smp, "--model_path", f / "truncated.pt"], ("truncated.pt",)
    yield "sample", [*smp, "--model_path", w["ckpt"], "--type_model", "dinov2_vits14", "--use_head",
                     "--pretrained_encoder", "False"], ("--use_head", "dinov2_vits14")
    yield "sample", [*smp, "--model_path", w["ckpt"], "--type_model", "resnet18", "--use_head",
                     "--pretrained_encoder", "False"], ("--use_head", "resnet18")
    yield "sample", [*smp[:-1], f / "bombs", "--model_path", w["ckpt"]], ("bomb.png", "decompression bomb")
    yield "sample", [*smp[:2], "--out_dir", f / "a_file", "--data_dir", folder, "--model_path", w["ckpt"]], ("--out_dir",)
    nan = ["--model_path", f / "nan.pt", *interp[2:]]
    yield "interpolate", [*nan, "--first_image_path", photos[0], "--second_image_path", photos[1]], ("nan.pt", "NaN")
    yield "manipulate", [*nan, "--image_path", photos[0], "--image_target_path", photos[1], "--folder_nn_path",
                         folder, "--n_neighbors", "2", "--n_common", "1"], ("nan.pt", "NaN")
    yield "interpolate", [*interp, "--first_image_path", f / "bombs" / "bomb.png", "--second_image_path", photos[1]], \
        ("--first_image_path", "bomb.png")
    yield "interpolate", [*interp[:-2], "--out_dir", f / "a_file" / "x", "--first_image_path", photos[0],
                          "--second_image_path", photos[1]], ("--out_dir",)
    yield "manipulate", [*interp, "--image_path", f / "bombs" / "bomb.png", "--image_target_path", photos[1],
                         "--folder_nn_path", folder, "--n_neighbors", "2", "--n_common", "1"], ("--image_path", "bomb.png")
    ev = ["--out_json", out / "scores.json"]
    for name in ("empty", "zero", "zero_k", "truncated", "object", "text", "nan_features"):
        yield "eval", [f / f"{name}.npz", *ev], (f"{name}.npz",)
    yield "eval", [w["good"], "--out_json", f / "a_file" / "x.json"], ("--out_json",)
    yield "eval", [w["good"], "--use_head", "--type_model", "mae_vitb16", *ev], ("--use_head",)
    yield "benchmark", ["--out", f / "a_file" / "x.json"], ("--out",)
    yield "benchmark", ["--out", f], ("--out",)
    yield "benchmark", ["--device", "cuda", "--out", out / "b.json"], ("--device",)
    yield "benchmark", ["--device", "nonsense", "--out", out / "b.json"], ("--device",)
    yield "benchmark", ["--smoke", "--configs", "bogus", "--out", out / "b.json"], ("--configs",)
    yield "benchmark", ["--smoke", "--iters", "5", "--out", out / "b.json"], ("--smoke", "--iters")
    yield "benchmark", ["--batch_sizes", "2,x", "--out", out / "b.json"], ("--batch_sizes",)
    yield "benchmark", ["--skip", "everything", "--out", out / "b.json"], ("--skip",)
    yield "quickstart", ["--out_dir", f / "a_file"], ("--out_dir",)
    yield "run_with_submitit.py", [*tr, "--local", "--use_head"], ("--use_head",)
    yield "run_with_submitit.py", [*tr, "--local", "--schedule_sampler", "bogus"], ("--schedule_sampler",)
    yield "run_with_submitit.py", [*tr, "--local", "--feat_cache", f / "a_file"], ("--feat_cache",)


OTHER_COUNT = 49  # the cases _other_cases yields (counted in the report of the bad inputs tested)


def _too_long(signum, frame):
    raise TimeoutError("the command started real work instead of refusing")


def test_other_bad_inputs_are_one_line_and_write_nothing(world, files, capsys):
    signal.signal(signal.SIGALRM, _too_long)
    cases = list(_other_cases(world, files))
    assert len(cases) == OTHER_COUNT
    failures = []
    for command, argv, expect in cases:
        if os.environ.get("BAD_INPUTS_VERBOSE"):
            print(command, argv[-3:], file=sys.__stderr__, flush=True)
        signal.alarm(60)  # a case that starts real work fails instead of running on
        try:
            assert_refused(capsys, world["root"], command, argv, *expect)
        except Exception as err:  # noqa: BLE001 (every failing case is listed)
            capsys.readouterr()
            failures.append(f"{command} {[str(a)[-30:] for a in argv[-4:]]}: {type(err).__name__}: {str(err)[:500]}")
        finally:
            signal.alarm(0)
    assert not failures, "\n\n".join(failures)


# ----------------------------------------------------------------------------- the download cache keeps only what fits


@pytest.fixture(scope="module")
def mirrors(world):
    """Two mirror folders. `wrong` holds files of the published layouts but other architectures: a
    ResNet-18 in DINO's `{"teacher": ...}` under the name of DINO's ResNet-50, a 32-px UNet under the
    name of the published DINO-trunk RCDM. `good` holds the published architectures (random weights,
    large tensors one row broadcast: small files)."""
    import torchvision

    from helpers_hub import random_state, write_rcdm_file, write_upstream_file
    from guided_diffusion_rcdm.script_util import create_model_and_diffusion

    wrong, good = world["root"] / "mirrors" / "wrong", world["root"] / "mirrors" / "good"
    wrong.mkdir(parents=True)
    good.mkdir()
    with torch.device("meta"):
        resnet18 = {k: list(v.shape) for k, v in torchvision.models.resnet18().state_dict().items()}
    teacher = {f"module.backbone.{k}": v for k, v in random_state(resnet18, 0, big=1 << 14).items()}
    torch.save({"teacher": teacher}, wrong / "dino_resnet50_pretrain_full_checkpoint.pth")
    unet, _ = create_model_and_diffusion(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                                         attention_resolutions="16", learn_sigma=True, feat_cond=True, ssl_dim=2048)
    torch.save(unet.state_dict(), wrong / "rcdm_ema_dino_trunk.pt")
    write_upstream_file("dino", good)
    write_rcdm_file(good / "rcdm_ema_dino_trunk.pt", "trunk")
    return {"wrong": wrong, "good": good}


def test_a_mirror_file_of_another_architecture_is_one_line_and_never_used_or_cached(world, mirrors, capsys,
                                                                                    monkeypatch):
    """A directory mirror (its files are used in place): the encoder of `rcdm train` and the published
    RCDM of `rcdm sample` are refused in one line naming the file and its first tensor of another shape;
    nothing is created anywhere, the download cache included."""
    monkeypatch.setenv("RCDM_MIRROR", str(mirrors["wrong"]))
    monkeypatch.setenv("TORCH_HOME", str(world["root"] / "torch_home"))
    out, folder = world["root"] / "out", world["folder"]
    assert_refused(capsys, world["root"], "train",
                   ["--data_dir", folder, "--out_dir", out, "--feat_cond", "--type_model", "dino"],
                   f"{mirrors['wrong'] / 'dino_resnet50_pretrain_full_checkpoint.pth'} is not the expected checkpoint",
                   "the dino ResNet-50 trunk does not fit",
                   "layer1.0.conv1.weight: file [64, 64, 3, 3], model [64, 64, 1, 1]", "nothing was cached")
    assert_refused(capsys, world["root"], "sample",
                   ["--data_dir", folder, "--out_dir", out, "--device", "cpu", "--type_model", "dino"],
                   f"{mirrors['wrong'] / 'rcdm_ema_dino_trunk.pt'} is not the expected checkpoint",
                   "the published 128x128 RCDM (dino, ssl_dim 2048) does not fit",
                   "time_embed.0.weight: file [128, 32], model [1024, 256]", "nothing was cached")
    assert not (world["root"] / "torch_home").exists()


def test_a_served_file_of_another_architecture_is_discarded_and_the_published_one_admitted(mirrors, tmp_path,
                                                                                           monkeypatch):
    """A URL mirror (its files are downloaded into the cache): the wrong architectures are discarded
    before they enter the cache; the published architectures are admitted under their names."""
    from helpers_hub import serve_directory
    from guided_diffusion_rcdm import hub
    from guided_diffusion_rcdm.encoders import resnets
    from guided_diffusion_rcdm.get_rcdm_models import get_dict_rcdm_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    with serve_directory(mirrors["wrong"]) as url:
        monkeypatch.setenv("RCDM_MIRROR", url)
        with pytest.raises(hub.DownloadError, match=r"dino_resnet50_pretrain_full_checkpoint.pth is not the "
                                                     r"expected checkpoint \(the dino ResNet-50 trunk does not fit"):
            resnets.fetch_weights("dino")
        with pytest.raises(hub.DownloadError, match=r"rcdm_ema_dino_trunk.pt is not the expected checkpoint "
                                                     r"\(the published 128x128 RCDM \(dino, ssl_dim 2048\) does not fit"):
            get_dict_rcdm_model("dino")
    assert not cache.exists() or not list(cache.iterdir())  # no file, no temporary
    with serve_directory(mirrors["good"]) as url:
        monkeypatch.setenv("RCDM_MIRROR", url)
        assert resnets.fetch_weights("dino") == str(cache / "dino_resnet50_pretrain_full_checkpoint.pth")
        assert get_dict_rcdm_model("dino")["ssl_emb.weight"].shape == (1024, 2048)
    assert sorted(p.name for p in cache.iterdir()) == ["dino_resnet50_pretrain_full_checkpoint.pth",
                                                      "rcdm_ema_dino_trunk.pt"]
