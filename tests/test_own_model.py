"""model.source: python: the user's own architecture from a recipe, by `package.module:factory`."""

import json

import pytest

from qat_sadam.cli import main

OWN = """
from torch import nn


def tiny(num_classes, width=8):
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


def broken():
    raise RuntimeError("no weights file next to me")


def not_a_module():
    return 3


class _Dense(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        return {"out": self.conv(x)}


def dense():
    return _Dense()


def rgb(num_classes):
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
"""


@pytest.fixture
def own_module(tmp_path, monkeypatch):
    (tmp_path / "user_nets.py").write_text(OWN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_nets"


def _train(out, *sets):
    args = [
        "train",
        "quickstart",
        "--out",
        str(out),
        "--quiet",
        "--set",
        "model.source=python",
        "--set",
        "max_steps=30",
    ]
    return main(args + [a for s in sets for a in ("--set", s)])


def test_a_recipe_trains_and_exports_the_users_own_factory(tmp_path, own_module, capsys):
    out = tmp_path / "run"
    assert _train(out, f"model.name={own_module}:tiny", "model.kwargs={width: 12}") == 0
    rep = json.loads((out / "export" / "validation.json").read_text())
    assert rep["passed"] and rep["parity"]["torch_integer_vs_ort"]["max_lsb"] == 0.0
    assert rep["fusion"]["integer_kernels"] == 2  # the conv and the linear of the user's net
    assert "width: 12" in (out / "recipe.yaml").read_text()


@pytest.mark.parametrize(
    "name,kwargs,message",
    [
        ("user_nets:missing", None, "user_nets has no callable 'missing'"),
        ("no_such_package.nets:tiny", None, "cannot import no_such_package.nets (ModuleNotFoundError"),
        ("user_nets", None, "takes model.name as package.module:factory"),
        ("user_nets:tiny", "{depth: 3}", "TypeError: tiny() got an unexpected keyword argument 'depth'"),
        ("user_nets:broken", None, "RuntimeError: no weights file next to me"),
        ("user_nets:not_a_module", None, "returned a int, not a torch.nn.Module"),
        (
            "user_nets:dense",
            None,
            "returns dict for a batch of 2; a recipe for classification trains a model returning logits (2, 10)",
        ),
        ("user_nets:rgb", None, "fails on the data's images (1, 8, 8): RuntimeError: Given groups=1"),
    ],
)
def test_a_factory_that_cannot_build_is_one_line_and_exit_2(tmp_path, own_module, capsys, name, kwargs, message):
    sets = [f"model.name={name}"] + ([f"model.kwargs={kwargs}"] if kwargs else [])
    assert _train(tmp_path / "run", *sets) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_kwargs_without_a_python_source_is_refused(tmp_path, capsys):
    assert main(["recipe", "show", "quickstart", "--set", "model.kwargs={width: 3}"]) == 2
    assert "applies to model.source: python" in capsys.readouterr().err
