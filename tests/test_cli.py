"""The command-line layer: one declaration per flag, one boolean convention, one error policy.

Every command's parser is checked against the declarations (data-driven over the parsers), and
the user's mistakes are run through the commands' real `main(argv)` in this process (many cases,
one interpreter start-up): each must be one line naming the flag, exit status 2, and leave the
output folder uncreated. One console-command test runs a real subprocess.
"""

from __future__ import annotations

import argparse
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _sampling_helpers import REPO, make_tiny_checkpoint, write_photos
from guided_diffusion_rcdm import __main__ as rcdm_command
from guided_diffusion_rcdm.apps import benchmark, explore, quickstart, warm_start
from guided_diffusion_rcdm.cli import cache, evaluate, sample, train
from guided_diffusion_rcdm.cli.flags import FLAGS, parse_args
from guided_diffusion_rcdm.cli.policy import run_main
from guided_diffusion_rcdm.errors import UsageError
from guided_diffusion_rcdm.script_util import MODEL_FLAGS, str2bool

sys.path.insert(0, str(REPO))  # run_with_submitit.py
import run_with_submitit  # noqa: E402

PARSERS = {
    "train": train.create_argparser,
    "sample": sample.sample_argparser,
    "interpolate": sample.interpolate_argparser,
    "manipulate": sample.manipulate_argparser,
    "eval": evaluate.create_argparser,
    "cache": cache.create_argparser,
    "run_with_submitit": run_with_submitit.create_argparser,
    "quickstart": quickstart.create_argparser,
    "benchmark": benchmark.create_argparser,
    "explore": explore.create_argparser,
    "warm_start_benchmark": warm_start.create_argparser,
}
POSITIONAL = {"eval": ["samples.npz"]}  # what a parser needs besides flags
# Flags that belong to one command only and are declared there (the launcher's job flags).
LOCAL_FLAGS = {"run_with_submitit": {f.name for f in run_with_submitit.JOB_FLAGS},
               "quickstart": {f.name for f in quickstart.QUICKSTART_FLAGS},
               "benchmark": {f.name for f in benchmark.BENCHMARK_FLAGS},
               "explore": {f.name for f in explore.EXPLORE_FLAGS},
               "warm_start_benchmark": {f.name for f in warm_start.BENCH_FLAGS}}


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt[2:]: action for action in parser._actions for opt in action.option_strings
            if opt.startswith("--") and opt != "--help"}


def _booleans(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(name for name, action in _options(parser).items() if action.type is str2bool)


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_flag_is_the_declared_one(command):
    parser = PARSERS[command]()
    for name, action in _options(parser).items():
        if name in LOCAL_FLAGS.get(command, ()):
            continue
        declared = FLAGS.get(name) or next((f for f in FLAGS.values() if name in f.aliases), None)
        assert declared is not None, f"{command}: --{name} is not declared in cli.flags"
        expected_type = str2bool if declared.type is bool else declared.type
        assert getattr(action.type, "__wrapped__", action.type) is expected_type, (command, name)
        assert action.dest == declared.name, (command, name)
        if declared.choices:  # a command may narrow them
            assert set(action.choices) <= set(declared.choices), (command, name)


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_boolean_takes_the_originals_values_and_the_bare_switch(command):
    parser = PARSERS[command]()
    pos = POSITIONAL.get(command, [])
    names = _booleans(parser)
    assert names, command
    for name in names:
        dest = _options(parser)[name].dest
        for argv, expected in (([f"--{name}"], True), ([f"--{name}", "True"], True),
                               ([f"--{name}", "False"], False), ([f"--{name}", "yes"], True),
                               ([f"--{name}", "0"], False), ([f"--{name}", "1"], True), ([f"--{name}", "no"], False)):
            args = parse_args(parser, [*pos, *argv])
            assert getattr(args, dest) is expected, (command, argv)
            assert dest in args.explicit
        # a bare switch followed by another flag
        other = next(o for o in ("seed", "nodes", "iters", "batch_size") if o in _options(parser))
        assert getattr(parse_args(parser, [*pos, f"--{name}", f"--{other}", "3"]), dest) is True


def test_the_encoder_flags_are_the_same_in_every_command():
    for command in ("train", "sample", "interpolate", "manipulate", "eval", "cache"):
        options = _options(PARSERS[command]())
        for name in ("type_model", "use_head", "pretrained_encoder", "encoder_normalize", "encoder_pooling",
                     "encoder_input_size"):
            assert name in options, (command, name)
    pos = POSITIONAL.get("eval", [])
    args = parse_args(evaluate.create_argparser(), [*pos, "--encoder_pooling", "mean_patch",
                                                    "--encoder_input_size", "112"])
    assert (args.encoder_pooling, args.encoder_input_size) == ("mean_patch", 112)


def test_the_switches_of_the_original_work_everywhere():
    # `--use_head` bare was refused by image_eval before; `--feat_cond True` by the sampling scripts
    assert parse_args(evaluate.create_argparser(), ["s.npz", "--use_head"]).use_head is True
    assert parse_args(sample.sample_argparser(), ["--feat_cond", "True", "--use_head"]).use_head is True
    assert parse_args(sample.manipulate_argparser(), ["--dist"]).dist is True
    assert parse_args(train.create_argparser(), ["--feat_cond", "--use_head", "False"]).feat_cond is True
    assert parse_args(train.create_argparser(), ["--channels_last", "--compile", "False"]).channels_last is True


def test_old_flag_names_are_hidden_aliases():
    args = parse_args(sample.sample_argparser(), ["--sampling_steps", "7"])
    assert args.steps == 7 and "steps" in args.explicit
    args = parse_args(evaluate.create_argparser(), ["s.npz", "--download", "False"])
    assert args.download_inception is False
    assert parse_args(evaluate.create_argparser(), ["s.npz"]).download_inception is True
    helptext = evaluate.create_argparser().format_help()
    assert "--download_inception" in helptext and "--download " not in helptext
    assert "--sampling_steps" not in sample.sample_argparser().format_help()


def test_model_flags_come_from_the_one_declaration():
    for make in (train.create_argparser, sample.sample_argparser):
        args = parse_args(make(), [])
        assert {k: getattr(args, k) for k in MODEL_FLAGS} == {k: f.default for k, f in MODEL_FLAGS.items()}
        options = _options(make())
        assert all(options[k].help.startswith(f.help) for k, f in MODEL_FLAGS.items())


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    photos = write_photos(root / "photos", ("astronaut", "coffee", "chelsea"))
    (root / "empty" / "sub").mkdir(parents=True)
    (root / "empty" / "notes.txt").write_text("no images here")
    (root / "a_file").write_text("x")
    no_feats = root / "orig.npz"
    np.savez(no_feats, arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    return {"root": root, "photos": photos, "ckpt": make_tiny_checkpoint(root / "tiny.pt"), "no_feats": no_feats}


def _user_error(capsys, run, argv, out_dir: Path | None, *expect: str) -> None:
    try:
        status = run(list(map(str, argv)))
    except SystemExit as exit_:  # the parser's own mistakes
        status = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, (argv, err)
    assert len(lines) == 1 and "Traceback" not in err, (argv, err)
    assert all(text in lines[0] for text in expect), (argv, lines[0])
    if out_dir is not None:
        assert not out_dir.exists(), (argv, "the output folder was created")


def test_sampling_mistakes_are_one_line_status_2_and_write_nothing(inputs, capsys, monkeypatch):
    root, photos = inputs["root"], inputs["photos"]
    out = root / "out_sample"
    common = ["--model_path", inputs["ckpt"], "--timestep_respacing", "2", "--device", "cpu", "--out_dir", out]
    folder = Path(photos[0]).parent

    def run_sample(argv):
        return sample.main("sample", argv, "rcdm sample")

    cases = [
        ([*common, "--data_dir", root / "nowhere"], ("--data_dir", "no such folder")),
        ([*common, "--data_dir", root / "empty"], ("--data_dir", "holds no images")),
        ([*common], ("--data_dir", "no folder given")),
        ([*common, "--data_dir", folder, "--num_images", "5"], ("--num_images 5", "3 image(s)", "lower --num_images")),
        ([*common, "--data_dir", folder, "--batch_size", "many"], ("--batch_size", "invalid int value")),
        ([*common, "--data_dir", folder, "--use_head", "perhaps"], ("--use_head", "boolean value expected")),
        ([*common, "--data_dir", folder, "--batch_size", "0"], ("--batch_size", "0 is outside the accepted range")),
        (["--model_path", root / "none.pt", "--data_dir", folder, "--out_dir", out], ("--model_path", "no such file")),
        ([*common, "--data_dir", folder, "--sampler", "euler"], ("--sampler", "invalid choice")),
        ([*common, "--data_dir", folder, "--steps", "500"], ("--steps must be between 1 and 100, got 500",)),
        # a checkpoint that does not fit the flags: another encoder width
        ([*common, "--data_dir", folder, "--type_model", "resnet50", "--pretrained_encoder", "False"],
         ("--type_model resnet50", "2048-d", "512-d")),
        ([*common, "--data_dir", folder, "--guidance_scale", "2"], ("--guidance_scale 2.0", "--feat_drop_prob")),
        ([*common[:-1], root / "a_file" / "out", "--data_dir", folder], ("--out_dir", "a_file", "cannot create it")),
    ]
    for argv, expect in cases:
        _user_error(capsys, run_sample, argv, out, *expect)

    interp = ["--model_path", inputs["ckpt"], "--device", "cpu", "--out_dir", out]
    for argv, expect in (
        ([*interp, "--second_image_path", photos[1]], ("--first_image_path is required",)),
        ([*interp, "--first_image_path", root / "nope.jpg", "--second_image_path", photos[1]],
         ("--first_image_path", "no such file")),
        ([*interp, "--first_image_path", photos[0], "--second_image_path", root / "empty"],
         ("--second_image_path", "is a folder")),
        ([*interp, "--first_image_path", photos[0], "--second_image_path", photos[1], "--batch_size", "1"],
         ("--batch_size", "at least 2")),
    ):
        _user_error(capsys, lambda a: sample.main("interpolate", a), argv, out, *expect)

    manip = [*interp, "--image_path", photos[0], "--image_target_path", photos[1]]
    for argv, expect in (
        ([*manip, "--folder_nn_path", root / "empty"], ("--folder_nn_path", "holds no images")),
        ([*manip, "--folder_nn_path", folder], ("--n_neighbors 20", "3 image(s) in --folder_nn_path")),
        ([*manip, "--folder_nn_path", folder, "--n_neighbors", "3", "--n_common", "3"], ("--n_common 3",)),
    ):
        _user_error(capsys, lambda a: sample.main("manipulate", a), argv, out, *expect)

    # no --model_path and no network: the published checkpoint's download fails, naming the file,
    # the cache folder to put it in and the mirror variable
    mirror = root / "mirror"
    mirror.mkdir(exist_ok=True)
    monkeypatch.setenv("RCDM_MIRROR", str(mirror))
    monkeypatch.setenv("TORCH_HOME", str(root / "torch_home"))
    _user_error(capsys, run_sample, ["--data_dir", folder, "--type_model", "barlow", "--device", "cpu",
                                     "--out_dir", out], out, "rcdm_ema_barlow_trunk.pt", "RCDM_MIRROR",
                str(root / "torch_home"))


def test_evaluation_and_training_mistakes_are_one_line_status_2_and_write_nothing(inputs, capsys, monkeypatch):
    root, photos = inputs["root"], inputs["photos"]
    out = root / "out_eval" / "scores.json"
    for argv, expect in (
        ([root / "missing.npz", "--out_json", out], ("no such sample file",)),
        ([inputs["no_feats"], "--out_json", out], ("no 'features'", "--fidelity False")),
        ([inputs["no_feats"], "--fidelity", "False", "--out_json", out], ("nothing to compute",)),
        ([inputs["no_feats"], "--batch_size", "0", "--out_json", out], ("--batch_size", "0 is outside")),
        ([inputs["no_feats"], "--fidelity", "False", "--ref", root / "nope", "--out_json", out], ("--ref",)),
        ([inputs["no_feats"], "--out_json", root / "a_file" / "x.json"], ("--out_json", "a_file: is a file, not a folder")),
    ):
        _user_error(capsys, evaluate.main, argv, out.parent, *expect)
    # the Inception weights cannot be fetched: one line naming the file and what to do
    monkeypatch.setenv("RCDM_MIRROR", str(root / "empty"))
    monkeypatch.setenv("TORCH_HOME", str(root / "torch_home"))
    _user_error(capsys, evaluate.main, [inputs["no_feats"], "--fidelity", "False", "--ref", Path(photos[0]).parent,
                                        "--download_inception", "False", "--out_json", out], out.parent,
                "--inception_path")

    run = root / "run"
    common = ["--feat_cond", "--type_model", "resnet18", "--pretrained_encoder", "False", "--out_dir", run]
    folder = Path(photos[0]).parent
    for argv, expect in (
        (["--data_dir", root / "empty", *common], ("--data_dir", "holds no images")),
        (["--data_dir", root / "nowhere", *common], ("--data_dir", "no such folder")),
        (common, ("--data_dir", "no folder given")),
        (["--data_dir", folder, "--image_size", "33", *common], ("--image_size 33", "--channel_mult")),
        (["--data_dir", folder, "--num_channels", "48", "--channel_mult", "1,2", "--image_size", "32", *common],
         ("--num_channels 48", "multiple of 32")),
        (["--data_dir", folder, "--lr", "fast", *common], ("--lr", "invalid float value")),
        (["--data_dir", folder, "--norm_style", "cbn", "--type_model", "resnet18", "--out_dir", run],
         ("--norm_style cbn", "--feat_cond")),
        # an encoder that cannot be built as asked: before the output folder is touched
        (["--data_dir", folder, "--encoder_pooling", "mean_patch", *common], ("--encoder_pooling", "resnet18",
                                                                             "not a Vision Transformer")),
    ):
        _user_error(capsys, train.main, argv, run, *expect)
    _user_error(capsys, cache.main, ["--data_dir", folder], None, "--feat_cache is required")
    _user_error(capsys, cache.main, ["--data_dir", root / "empty", "--feat_cache", run], run, "holds no images")


def test_quickstart_and_benchmark_mistakes_are_one_line_status_2(inputs, capsys):
    root = inputs["root"]
    out = root / "qs"
    for argv, expect in (
        (["--num_channels", "48", "--out_dir", out], ("--num_channels must be a multiple of 32",)),
        (["--steps", "0", "--out_dir", out], ("--steps", "0 is outside the accepted range")),
        (["--sampling_steps", "0", "--out_dir", out], ("--sampling_steps", "0 is outside")),  # the old name
        (["--image_size", "48", "--out_dir", out], ("--image_size", "invalid choice")),
        (["--retrain", "maybe", "--out_dir", out], ("--retrain", "boolean value expected")),
        (["--out_dir", root / "a_file" / "qs"], ("--out_dir", "a_file", "cannot create it")),
    ):
        _user_error(capsys, quickstart.main, argv, out, *expect)
    _user_error(capsys, benchmark.main, ["--device", "gpu"], None, "--device")
    _user_error(capsys, benchmark.main, ["--iters", "x"], None, "--iters", "invalid int value")


def test_an_unexpected_error_keeps_its_traceback_and_a_user_error_does_not(monkeypatch):
    def bug():
        return 1 / 0

    with pytest.raises(ZeroDivisionError):
        run_main(bug, "rcdm test")

    def mistake():
        raise UsageError("--flag x: what to do")

    assert run_main(mistake, "rcdm test") == 2

    monkeypatch.setenv("RCDM_DEBUG", "1")  # the traceback of a mistake, on demand
    with pytest.raises(UsageError, match="--flag x"):
        run_main(mistake, "rcdm test")


def test_the_rcdm_command_runs_every_subcommand(tmp_path, capsys):
    assert rcdm_command.main(["--help"]) == 0
    listed = capsys.readouterr().out
    for name in ("train", "sample", "interpolate", "manipulate", "eval", "cache", "quickstart", "benchmark",
                 "explore"):
        assert name in listed
        with pytest.raises(SystemExit) as exit_:
            rcdm_command.main([name, "--help"])
        assert exit_.value.code == 0 and f"usage: rcdm {name}" in capsys.readouterr().out
    assert rcdm_command.main(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err
    # the console command as installed: `rcdm` is `python -m guided_diffusion_rcdm`
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "guided_diffusion_rcdm", "train", "--data_dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("rcdm train: error: --data_dir"), proc.stderr
    # the entry point setup.py installs as `rcdm` resolves to this function
    setup = (REPO / "setup.py").read_text()
    target = re.search(r'"rcdm = ([\w.]+:\w+)"', setup).group(1)
    assert pkgutil.resolve_name(target) is rcdm_command.main
