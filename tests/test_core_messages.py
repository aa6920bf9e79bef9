"""The core's errors speak the library's language: they name the argument a caller passed, in
backticks (`` `steps` must be between 1 and 40, got 0 ``), never a command-line flag; the commands'
error policy (`cli.policy.flag_message`) turns each name into the command's flag, in one place."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from guided_diffusion_rcdm.cli.policy import KEYWORD_FLAGS, flag_message, run_main
from guided_diffusion_rcdm.encoders import EncoderSpec
from guided_diffusion_rcdm.errors import UserError
from guided_diffusion_rcdm.feature_cache import prepare_feature_cache
from guided_diffusion_rcdm.loading import load_components, resolve_device
from guided_diffusion_rcdm.metrics import load_inception
from guided_diffusion_rcdm.samplers import respace_for_sampler
from guided_diffusion_rcdm.script_util import check_model_flags, create_gaussian_diffusion

PACKAGE = Path(__file__).resolve().parents[1] / "guided_diffusion_rcdm"


@pytest.fixture(scope="module")
def diffusion():
    return create_gaussian_diffusion(steps=40)


def library_calls(tmp_path, diffusion):
    """`(keyword, call)`: a library call with one bad argument, and the keyword its error must name."""
    return [
        ("steps", lambda: respace_for_sampler(diffusion, "ddim", 0)),
        ("model_path", lambda: load_components(str(tmp_path / "missing.pt"), device="cpu")),
        ("device", lambda: resolve_device("not-a-device")),
        ("use_head", lambda: EncoderSpec("timm:resnet18", use_head=True)),
        ("input_size", lambda: EncoderSpec("resnet18", input_size=-1)),
        ("weights", lambda: EncoderSpec("timm:resnet18", weights=str(tmp_path / "none.pth"))),
        ("image_size", lambda: check_model_flags(image_size=0)),
        ("dtype", lambda: prepare_feature_cache(str(tmp_path), str(tmp_path), [], EncoderSpec("dino"), dtype="int8")),
        ("path", lambda: load_inception(str(tmp_path / "no_inception.pth"), download=False)),
    ]


def test_library_errors_name_the_keyword_not_a_flag(tmp_path, diffusion):
    for keyword, call in library_calls(tmp_path, diffusion):
        with pytest.raises(UserError) as err:
            call()
        message = str(err.value)
        assert f"`{keyword}`" in message and "--" not in message, message


def parser_with(*flags: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rcdm test")
    for flag in flags:
        parser.add_argument(flag)
    return parser


def test_flag_message_names_the_commands_flag():
    parser = parser_with("--steps", "--feat_cache", "--inception_path", "--encoder_pooling")
    # A keyword spelled as the flag; a renamed one (the table); one the command has no flag for.
    assert flag_message("`steps` must be at least 1, got 0", parser) == "--steps must be at least 1, got 0"
    assert KEYWORD_FLAGS["cache_dir"] == "--feat_cache"
    assert flag_message("pass another `cache_dir` folder", parser) == "pass another --feat_cache folder"
    assert flag_message("`path` x.pth: no such file", parser) == "--inception_path x.pth: no such file"
    assert flag_message("`pooling` 'max': choose one of", parser) == "--encoder_pooling 'max': choose one of"
    assert flag_message("`n_common` must be >= 0, got -1", parser) == "n_common must be >= 0, got -1"
    # A renamed keyword whose flag this command lacks reads bare, not as another command's flag.
    assert flag_message("`path` x.pth", parser_with("--model_path")) == "path x.pth"
    # Without a parser (the explorer's page) every name reads bare; other text is left alone.
    assert flag_message("`steps` 0 (`hf download a/b` there)") == "steps 0 (`hf download a/b` there)"


def test_a_commands_error_line_names_its_flag(capsys, diffusion):
    parser = parser_with("--steps")
    status = run_main(lambda: respace_for_sampler(diffusion, "ddim", 0), parser.prog, parser)
    assert status == 2
    assert capsys.readouterr().err == "rcdm test: error: --steps must be between 1 and 40, got 0\n"


# Core strings that still name a `--flag`, each with why: (file, a fragment of the string; "--"
# stands for exactly the piece "--" an f-string puts before `{name}`).
ALLOWED = [
    # The `rcdm` dispatcher: the command line itself (a top-level module, like the applications).
    ("__main__.py", ""),
    # Help texts of the model flags (argparse help, read with --help).
    ("config.py", "when --num_head_channels is -1"),
    ("config.py", "(-1: --num_heads)"),
    ("config.py", "overriding --num_heads"),
    ("config.py", "default: by --image_size"),
    ("config.py", "with --norm_style cbn: width"),
    ("config.py", "(enables --guidance_scale when sampling"),
    # Argparse helpers: they declare `--key` options and format flags for a command's log line.
    ("script_util.py", "--"),  # add_dict_to_argparser's f"--{k}"
    ("hub.py", "--"),  # format_flags' f"--{k} ...", used by `rcdm train`'s log
    # Other programs' flags (torchrun, run_with_submitit.py), said in a launch error.
    ("dist_util.py", "torchrun --nproc_per_node"),
    # Warnings and log lines do not pass through the commands' error policy: they keep advice for
    # the command line.
    ("precision.py", "--precision bf16: bf16 is "),
    ("precision.py", "--precision auto picks"),
    ("train_util.py", "resuming: --init_from "),
    ("loading.py", "--"),  # the ignored-architecture-flags warning, f"--{k} {value} (checkpoint: ...)"
]
FLAG = re.compile(r"(?<![\w-])--([a-z]|$)")  # `--steps`, or `--` before an f-string's {name}


def core_strings():
    """`(file, line, text)` of every string in the core (the package less cli/ and apps/) except
    docstrings: messages, and the pieces f-strings build them from."""
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(("cli/", "apps/")):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                yield rel, node.lineno, node.value


def test_no_core_message_names_a_command_line_flag():
    """Guards the library's language: a core string naming `--flag` must name the keyword in
    backticks instead (the command line maps it back), or be allowed above, with its reason."""
    def allowed(rel: str, text: str) -> bool:
        return any(rel == f and (text == "--" if fragment == "--" else fragment in text) for f, fragment in ALLOWED)

    found = [(rel, line, text) for rel, line, text in core_strings() if FLAG.search(text) and not allowed(rel, text)]
    assert not found, "\n".join(f"{rel}:{line}: {text!r}" for rel, line, text in found)
