"""The package stands on its own: recipes and target profiles ship inside it, by name, and an
installed wheel trains and exports from a folder that holds nothing of the checkout."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from qat_sadam import configs
from qat_sadam.cli import main
from qat_sadam.errors import RecipeError, ValidationError
from qat_sadam.export import load_target
from qat_sadam.train.recipe import load_recipe, reference

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_shipped_recipes_and_targets_resolve_by_name_and_paths_stay_paths(tmp_path):
    assert {"quickstart", "quickstart_float", "resnet18_finetune"} <= set(configs.names("recipe"))
    assert {"cpu-x86", "mobile-arm", "intel-edge"} <= set(configs.names("target"))
    assert load_recipe("quickstart").name == "quickstart"
    assert load_target("mobile-arm").fixed_batch == 1
    mine = tmp_path / "mine.yaml"
    mine.write_text("name: mine\nepochs: 3\n")
    assert load_recipe(str(mine)).epochs == 3
    with pytest.raises(RecipeError, match="no recipe named 'quickstrat' ships with qat-sadam.*quickstart"):
        load_recipe("quickstrat")
    with pytest.raises(ValidationError, match="no target named 'phone'"):
        load_target("phone")
    with pytest.raises(RecipeError, match="recipe file not found: quickstart.yaml"):
        load_recipe("quickstart.yaml")  # a path, read as given: no fallback to the shipped name


def test_cli_lists_shipped_recipes_and_targets_and_shows_a_resolved_recipe(capsys):
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    assert "quickstart_finetune" in listing and "resnet18_float" in listing
    assert main(["targets"]) == 0
    assert re.search(r"^mobile-arm +Phones and ARM edge boxes", capsys.readouterr().out, re.M)
    assert main(["recipe", "show", "quickstart", "--bits", "3", "--set", "epochs=2"]) == 0
    shown = capsys.readouterr().out
    assert "epochs: 2\n" in shown and "bits: 3" in shown and "bn_reestimate_batches: 0" in shown
    assert main(["recipe", "show", "nosuch"]) == 2


def test_cli_lists_the_model_names_a_recipe_can_use(capsys):
    assert main(["models"]) == 0
    assert re.search(r"^small_unet +A small U-Net for segmentation", capsys.readouterr().out, re.M)
    assert main(["models", "--source", "torchvision"]) == 0
    names = capsys.readouterr().out.split()
    assert "resnet18" in names and "mobilenet_v2" in names and "fcn_resnet50" not in names  # classifiers


def _fresh_venv_with_the_wheel(tmp_path: pathlib.Path) -> pathlib.Path:
    """A new venv holding only the built wheel; its dependencies (torch: 5 GB, minutes to install)
    come from this environment's site-packages through a .pth line, which adds no .pth of its own
    (so not this checkout's editable install)."""
    src = tmp_path / "src"  # built from a copy: building in the checkout leaves build/ and egg-info there
    shutil.copytree(REPO / "qat_sadam", src / "qat_sadam", ignore=shutil.ignore_patterns("__pycache__", "node_modules"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, src], check=True
    )
    (wheel,) = wheels.glob("qat_sadam-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "qat_sadam/configs/recipes/quickstart.yaml",
        "qat_sadam/configs/targets/mobile-arm.yaml",
        "qat_sadam/export/runtimes/web/package-lock.json",
        "qat_sadam/export/runtimes/web/run.cjs",
    } <= shipped
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps", wheel],
        check=True,
    )
    site = pathlib.Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return venv


@pytest.mark.slow
def test_an_installed_wheel_trains_and_exports_by_name_from_an_empty_folder(tmp_path):
    venv = _fresh_venv_with_the_wheel(tmp_path)
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*args):
        return subprocess.run(
            [str(venv / "bin" / args[0]), *args[1:]], cwd=empty, env=env, capture_output=True, text=True
        )

    where = run("python", "-c", "import qat_sadam; print(qat_sadam.__file__)")
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr
    train = run(
        "qat-sadam",
        "train",
        "quickstart",
        "--out",
        "R",
        "--quiet",
        "--set",
        "epochs=1",
        "--set",
        "export.enabled=false",
    )  # exported once, below
    assert train.returncode == 0, train.stderr[-2000:]
    export = run("qat-sadam", "export", "R", "--target", "intel-edge", "--runtimes", "ort-cpu")
    assert export.returncode == 0, export.stdout[-2000:] + export.stderr[-2000:]
    assert "validation PASSED (target intel-edge)" in export.stdout
    assert (empty / "R" / "export" / "intel-edge" / "model.onnx").is_file()  # one folder per target
    assert sorted(p.name for p in empty.iterdir()) == ["R"]  # nothing written outside the run


def test_the_recipe_reference_in_the_guide_is_the_one_the_schema_generates():
    """docs/guide/recipes.md is written by `qat-sadam recipe reference > docs/guide/recipes.md`."""
    assert (REPO / "docs" / "guide" / "recipes.md").read_text() == reference()
