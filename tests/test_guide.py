"""Every Python example of the user guide runs as written (a block fenced ```python notest is
illustrative: it needs a trained run)."""

import pathlib
import re
import runpy

import pytest

GUIDE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "guide"
BLOCKS = [
    (page.name, i, code)
    for page in sorted(GUIDE.glob("*.md"))
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
