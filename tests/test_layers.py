"""The package's layers, read from the source with `ast`: the core (model, diffusion, samplers,
encoders, checkpoints, data, training, distributed) imports neither the command-line layer nor the
applications, the command-line layer does not import the applications, and nothing in the package
imports the scripts. Imports inside functions count as much as those at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "guided_diffusion_rcdm"

CORE, CLI, APPS, SCRIPTS = 0, 1, 2, 3
LAYER_NAMES = {CORE: "core", CLI: "command-line layer", APPS: "applications", SCRIPTS: "scripts"}
# The command-line layer: flag declarations, flags -> keyword arguments, the error policy, output
# files. Every other module of the package folder is core.
CLI_MODULES = (f"{PACKAGE}.cli",)
APPS_PACKAGE = f"{PACKAGE}.apps"
# The `rcdm` console command (`python -m guided_diffusion_rcdm`) runs the applications too.
TOP_MODULES = (APPS_PACKAGE, f"{PACKAGE}.__main__")
SCRIPT_MODULES = ("scripts", "run_with_submitit")


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(module: str) -> int | None:
    """The layer of a dotted module name; None for modules outside the project (torch, numpy, ...)."""
    if any(_within(module, s) for s in SCRIPT_MODULES):
        return SCRIPTS
    if not _within(module, PACKAGE):
        return None
    if any(_within(module, t) for t in TOP_MODULES):
        return APPS
    if any(_within(module, c) for c in CLI_MODULES):
        return CLI
    return CORE


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """`(line, dotted name)` of everything `source` imports, wherever the statement is. For
    `from X import y`, both `X` and `X.y` are listed (y may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            found.append((node.lineno, origin))
            found += [(node.lineno, f"{origin}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def upward_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """One line per import of `module` that reaches a higher layer than its own."""
    own = layer_of(module)
    problems = []
    for line, name in imported_modules(source, module, is_package):
        target = layer_of(name)
        if own is not None and target is not None and target > own:
            problems.append(f"{module} (line {line}, {LAYER_NAMES[own]}) imports {name} ({LAYER_NAMES[target]})")
    return sorted(set(problems))


def package_modules() -> list[tuple[Path, str, bool]]:
    return [(path, module_name(path, REPO), path.name == "__init__.py")
            for path in sorted((REPO / PACKAGE).rglob("*.py")) if "__pycache__" not in path.parts]


def test_the_package_is_read():
    modules = {name: layer_of(name) for _, name, _ in package_modules()}
    assert modules[f"{PACKAGE}.unet"] == CORE and modules[f"{PACKAGE}.train_util"] == CORE
    assert modules[f"{PACKAGE}.cli.sampling"] == CLI and modules[f"{PACKAGE}.training"] == CORE
    assert modules[f"{APPS_PACKAGE}.quickstart"] == APPS and modules[f"{APPS_PACKAGE}.benchmark"] == APPS
    assert sum(layer == CORE for layer in modules.values()) >= 20


def test_nothing_in_the_package_imports_upward():
    problems = []
    for path, name, is_package in package_modules():
        problems += upward_imports(path.read_text(encoding="utf-8"), name, is_package)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module, source, reported", [
    # top-level and function-level imports, absolute and relative, module and package forms
    (f"{PACKAGE}.unet", "from .apps import quickstart\n", f"{APPS_PACKAGE}.quickstart"),
    (f"{PACKAGE}.train_util", "def f():\n    from .cli import sampling\n", f"{PACKAGE}.cli.sampling"),
    (f"{PACKAGE}.hub", "import guided_diffusion_rcdm.cli.flags as flags\n", f"{PACKAGE}.cli.flags"),
    (f"{PACKAGE}.metrics", "class A:\n    def m(self):\n        from .cli import policy\n", f"{PACKAGE}.cli"),
    (f"{PACKAGE}.cli.flags", "from ..apps.benchmark import main\n", f"{APPS_PACKAGE}.benchmark"),
    (f"{PACKAGE}.cli.sampling", "from guided_diffusion_rcdm import apps\n", APPS_PACKAGE),
    (f"{PACKAGE}.apps.quickstart", "from scripts import image_train\n", "scripts"),
    (f"{PACKAGE}", "from .apps import benchmark\n", APPS_PACKAGE),  # the package's __init__
])
def test_an_upward_import_is_reported(module, source, reported):
    problems = upward_imports(source, module, is_package=module == PACKAGE)
    assert problems and any(p.endswith(f"imports {reported} ({LAYER_NAMES[layer_of(reported)]})") for p in problems)


@pytest.mark.parametrize("module, source", [
    (f"{PACKAGE}.apps.quickstart", "from .. import fileio\nfrom ..cli import sampling\nfrom ..train_util import TrainLoop\n"),
    (f"{PACKAGE}.cli.sampling", "from .flags import parse_args\nfrom ..script_util import str2bool\n"),
    (f"{PACKAGE}.unet", "import torch\nfrom . import nn\nfrom .nn import conv_nd\n"),
])
def test_downward_and_outside_imports_pass(module, source):
    assert upward_imports(source, module) == []
