"""The benchmarks and study scripts of tools/ load against the package as it is now: a renamed or
removed name they use fails here, not months later in a study. (Running each on a tiny model is
left to a later change; see docs/testing.md.)"""

import pathlib
import subprocess
import sys

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"

LOAD_ALL = """
import importlib.util, sys
for path in sys.argv[1:]:
    sys.path.insert(0, path.rsplit("/", 1)[0])  # a script may import its neighbour
    spec = importlib.util.spec_from_file_location(path.rsplit("/", 1)[1][:-3], path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
"""


def test_every_benchmark_and_study_script_imports():
    scripts = sorted(str(p) for p in TOOLS.glob("*/*.py"))
    assert len(scripts) >= 14
    done = subprocess.run([sys.executable, "-c", LOAD_ALL, *scripts], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_every_study_shell_script_parses():
    for script in sorted(TOOLS.glob("studies/*.sh")):
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, f"{script.name}: {done.stderr}"
