"""setup.py's version floors against what the package uses.

Each row of `APIS` names an API the package calls, the first release that has it, and a pattern
that finds it in the source: setup.py's floor must be at least that release wherever the pattern
occurs. An API newer than the floors belongs in the table. The Python floor is also checked on the
syntax (every file parses at the floor's grammar) and on `X | Y` unions evaluated at run time
(PEP 604, Python 3.10), which no grammar check sees.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(REPO / "guided_diffusion_rcdm").glob("*.py"), *(REPO / "scripts").glob("*.py"),
                  REPO / "run_with_submitit.py"])

# (distribution, first release with it, pattern in the source, the API)
APIS = [
    ("torch", (2, 5), r"torch\.serialization\.safe_globals", "torch.serialization.safe_globals"),
    ("torch", (2, 4), r"is_autocast_enabled\(\s*[^)\s]", "torch.is_autocast_enabled(device_type)"),
    ("torch", (2, 3), r"torch\.amp\.GradScaler", "torch.amp.GradScaler(device)"),
    ("torch", (2, 2), r"init_process_group\([^)]*\bdevice_id\s*=", "init_process_group(device_id=...)"),
    ("torch", (2, 1), r"load_state_dict\w*\([^)]*\bassign\s*=", "load_state_dict(assign=...)"),
    ("torch", (2, 1), r"torch\.load\([^)]*\bmmap\s*=", "torch.load(mmap=...)"),
    ("torch", (2, 1), r"torch\.utils\.flop_counter", "torch.utils.flop_counter"),
    ("torch", (2, 0), r"torch\.compile\(", "torch.compile"),
    ("torch", (2, 0), r"scaled_dot_product_attention", "F.scaled_dot_product_attention"),
    ("torch", (2, 0), r"with torch\.device\(", "torch.device as a context manager"),
    ("timm", (1, 0, 21), r'with torch\.device\("meta"\).*timm\.create_model|timm\.create_model.*with torch\.device\("meta"\)',
     "timm models built on the meta device"),
    ("torchvision", (0, 14), r"models\.(?:list_models|get_model_weights|get_model)\(", "torchvision.models.list_models"),
    ("python", (3, 10), r"\bzip\([^)]*\bstrict\s*=", "zip(strict=...)"),
    ("python", (3, 9), r"\.remove(?:prefix|suffix)\(", "str.removeprefix"),
]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def setup_floors() -> dict[str, tuple[int, ...]]:
    """{distribution: floor} from setup.py's `python_requires` and `install_requires` (read, not run)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("python_requires", "install_requires")}
    floors = {"python": _version(kwargs["python_requires"].split(">=")[1])}
    for requirement in kwargs["install_requires"]:
        name, _, floor = requirement.partition(">=")
        floors[name.strip()] = _version(floor) if floor else (0,)
    return floors


def _sources() -> dict[Path, str]:
    return {path: path.read_text() for path in SOURCES}


def test_the_floors_cover_every_api_the_package_uses():
    floors, sources = setup_floors(), _sources()
    too_new = []
    for dist, release, pattern, api in APIS:
        users = [p.relative_to(REPO) for p, text in sources.items() if re.search(pattern, text, re.S)]
        if users and floors.get(dist, (0,)) < release:
            too_new.append(f"{api} needs {dist} >= {'.'.join(map(str, release))} "
                           f"(setup.py: {'.'.join(map(str, floors.get(dist, (0,))))}; used in {users[0]})")
    assert not too_new, "\n".join(too_new)


def _annotation_nodes(tree: ast.AST) -> set[int]:
    inside = set()
    for node in ast.walk(tree):
        roots = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            roots = [a.annotation for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs,
                                            node.args.vararg, node.args.kwarg) if a is not None]
            roots.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            roots = [node.annotation]
        for root in roots:
            if root is not None:
                inside.update(id(n) for n in ast.walk(root))
    return inside


def _is_class_name(name: str) -> bool:
    return name[:1].isupper() and not name.isupper()


def _is_type_like(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return node.value is None
    if isinstance(node, ast.Subscript):
        return True  # dict[str, Any], Callable[...], ...
    if isinstance(node, ast.Name):
        return node.id in {"int", "float", "str", "bool", "bytes", "dict", "list", "tuple", "set"} or _is_class_name(node.id)
    if isinstance(node, ast.Attribute):
        return _is_class_name(node.attr)  # torch.Tensor; os.O_CREAT is a constant
    return isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr) and _is_type_like(node.left)


def runtime_unions(path: Path, text: str) -> list[str]:
    """Where `path` evaluates an `X | Y` type union at run time (not a postponed annotation)."""
    tree = ast.parse(text)
    postponed = any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
                    and any(a.name == "annotations" for a in n.names) for n in tree.body)
    skip = _annotation_nodes(tree) if postponed else set()
    lines = {node.lineno for node in ast.walk(tree)
             if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr) and id(node) not in skip
             and _is_type_like(node.left) and _is_type_like(node.right)}
    return [f"{path.relative_to(REPO)}:{line}" for line in sorted(lines)]


def test_the_python_floor_covers_the_syntax_and_the_run_time_unions():
    floor = setup_floors()["python"]
    unions = []
    for path, text in _sources().items():
        ast.parse(text, filename=str(path), feature_version=floor)  # a SyntaxError names the file
        unions += runtime_unions(path, text)
    assert not unions or floor >= (3, 10), (
        f"X | Y unions evaluated at import or run time need Python >= 3.10 (setup.py: "
        f"{'.'.join(map(str, floor))}): {', '.join(unions[:5])}"
    )


def test_the_union_finder_sees_what_python_3_9_would_fail_on(tmp_path):
    # the check above is only as good as this finder: module-level aliases and isinstance are
    # evaluated; postponed annotations are not
    sample = tmp_path / "sample.py"
    text = ("from __future__ import annotations\nimport torch\nAlias = dict[str, int] | None\n"
            "def f(x: torch.Tensor | None = None) -> int | None:\n    return isinstance(x, int | float)\n"
            "flags = a | b\n")
    sample.write_text(text)
    found = runtime_unions(REPO / "sample.py", text)
    assert found == ["sample.py:3", "sample.py:5"]


@pytest.mark.parametrize("dist", ["torch", "torchvision"])
def test_this_environment_meets_the_floors(dist):
    floors = setup_floors()
    assert sys.version_info[:2] >= floors["python"]
    assert _version(metadata.version(dist)) >= floors[dist]
