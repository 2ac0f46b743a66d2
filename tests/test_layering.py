"""The package's layers import downwards only (docs/architecture.md).

Every ``import`` of the package's own modules, at module level or inside a function, is read
from the source; a lower layer importing a higher one, or two units of one layer importing each
other, fails here. Imports inside functions are allowed only in the CLI, which defers torch so
that ``--help`` answers at once.
"""

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "qat_sadam"
# Lowest first. A unit is a subpackage or a top-level module of qat_sadam.
LAYERS = [
    {"errors"},  # the user-error hierarchy
    {
        "buffers",
        "metrics",
        "models",
        "configs",
    },  # buffer snapshots; task scores; model builders and weight loading; shipped recipes and targets
    {"quant"},  # quantizers
    {"optim", "export"},  # the optimizer, the deployment core: on the quantizers
    {"train"},  # the trainer: on all of the above
    {"workflows"},  # run directories: training, export, validation, comparisons
    {"cli", "__init__"},  # the command line, the public API
    {"__main__"},  # python -m qat_sadam: calls the command line
]
LAYER = {u: i for i, units in enumerate(LAYERS) for u in units}
LAZY_IMPORTS_ALLOWED = {"cli"}


def _unit(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).parts
    return rel[0] if len(rel) > 1 else rel[0][:-3]


def _imports(path: pathlib.Path):
    """(imported unit, line, inside a function) for each import of the package's own modules."""
    pkg = list(path.relative_to(ROOT).parts[:-1])
    tree = ast.parse(path.read_text())
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    in_func = {id(n) for f in funcs for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                parts = base + (node.module.split(".") if node.module else [])
                if not parts:  # "from . import x" at the top: x is the unit
                    parts = [a.name for a in node.names]
            elif node.module and node.module.split(".")[0] == "qat_sadam":
                parts = node.module.split(".")[1:]
            else:
                continue
        elif isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names if a.name.split(".")[0] == "qat_sadam"]
            if not names:
                continue
            parts = names[0][1:]
        else:
            continue
        if parts:
            yield parts[0], node.lineno, id(node) in in_func


def _edges():
    for path in sorted(ROOT.rglob("*.py")):
        for target, line, lazy in _imports(path):
            yield _unit(path), target, f"{path.relative_to(ROOT.parent)}:{line}", lazy


def test_every_unit_has_a_layer():
    units = {_unit(p) for p in ROOT.rglob("*.py")}
    assert units <= set(LAYER), f"units without a layer: {sorted(units - set(LAYER))}"


def test_lower_layers_never_import_higher_ones():
    bad = [
        f"{where}: {src} (layer {LAYER[src]}) imports {dst} (layer {LAYER.get(dst)})"
        for src, dst, where, _ in _edges()
        if src != dst and (dst not in LAYER or LAYER[dst] >= LAYER[src])
    ]
    assert not bad, "\n".join(bad)


def test_function_level_imports_of_the_package_only_in_the_cli():
    bad = [where for src, _, where, lazy in _edges() if lazy and src not in LAZY_IMPORTS_ALLOWED]
    assert not bad, "imports inside functions (a hidden cycle?): " + ", ".join(bad)


@pytest.mark.parametrize(
    "source,expect",
    [
        ("from ..train.trainer import Trainer\n", ("train", False)),
        ("def f():\n    from qat_sadam.workflows import compare\n", ("workflows", True)),
        ("import qat_sadam.cli\n", ("cli", False)),
    ],
)
def test_the_checker_sees_relative_absolute_and_lazy_imports(tmp_path, monkeypatch, source, expect):
    fake = tmp_path / "qat_sadam" / "export" / "x.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path / "qat_sadam")
    ((target, _, lazy),) = list(_imports(fake))
    assert (target, lazy) == expect


TOOLS = ROOT.parent / "tools"


def _tool_imports(path: pathlib.Path):
    """(module, name) for each name a tool imports from the package."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "qat_sadam":
            yield from ((node.module, a.name) for a in node.names)


@pytest.mark.parametrize("folder", ["benchmarks", "studies"])
def test_tools_import_only_public_names_of_the_package(folder):
    """The benchmarks and study scripts use the package as a user would: no private module or name."""
    scripts = sorted((TOOLS / folder).glob("*.py"))
    assert scripts, f"no scripts in tools/{folder}"
    bad = [
        f"{p.relative_to(TOOLS)}: from {module} import {name}"
        for p in scripts
        for module, name in _tool_imports(p)
        if name.startswith("_") or any(part.startswith("_") for part in module.split("."))
    ]
    assert not bad, "private names imported by tools: " + ", ".join(bad)
