"""Every Python example of the user guide runs as written (a block fenced ```python notest is
illustrative: it needs a trained run; api.md holds signatures, not examples)."""

import importlib.util
import inspect
import pathlib
import re
import runpy

import pytest

import qat_sadam

GUIDE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "guide"
BLOCKS = [
    (page.name, i, code)
    for page in sorted(GUIDE.glob("*.md"))
    if page.name != "api.md"
    for i, code in enumerate(re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M))
]


def test_the_guide_has_examples():
    assert any(name == "own-model.md" for name, _, _ in BLOCKS)


@pytest.mark.parametrize("page,index,code", BLOCKS, ids=[f"{n}#{i}" for n, i, _ in BLOCKS])
def test_a_guide_example_runs(page, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples write their files (model.onnx) where they run
    script = tmp_path / "example.py"
    script.write_text(code)
    runpy.run_path(str(script), run_name="__main__")


def test_the_api_reference_in_the_guide_is_the_one_the_docstrings_generate():
    """docs/guide/api.md is written by `python tools/api_reference.py > docs/guide/api.md`."""
    spec = importlib.util.spec_from_file_location("api_reference", GUIDE.parents[1] / "tools" / "api_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (GUIDE / "api.md").read_text() == module.reference()


def test_every_public_function_says_what_it_takes_and_returns():
    for name in qat_sadam.__all__:
        obj = getattr(qat_sadam, name)
        if inspect.isfunction(obj):
            doc = inspect.getdoc(obj) or ""
            assert "Args:" in doc and "Returns:" in doc, f"qat_sadam.{name}: no Args/Returns in its docstring"
