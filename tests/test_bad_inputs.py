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
