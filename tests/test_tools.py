"""The study scripts of tools/studies load against the package as it is now, and its shell scripts
parse: a renamed or removed name they use fails here, not months later in a study. The benchmarks
of tools/benchmarks run end to end on tiny models in test_benchmarks.py."""

import importlib.util
import pathlib
import subprocess

import pytest

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"


@pytest.mark.parametrize("script", sorted(TOOLS.glob("studies/*.py")), ids=lambda p: p.name)
def test_every_study_script_imports(script, monkeypatch):
    """In this process (torch is loaded already): a script's module-level code only imports and defines."""
    monkeypatch.syspath_prepend(str(script.parent))  # a script may import its neighbour
    spec = importlib.util.spec_from_file_location(script.stem, script)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_every_study_shell_script_parses():
    for script in sorted(TOOLS.glob("studies/*.sh")):
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, f"{script.name}: {done.stderr}"
