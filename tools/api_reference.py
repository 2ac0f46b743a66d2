"""Write the Python API reference of the user guide from the public API's signatures and docstrings:

    python tools/api_reference.py > docs/guide/api.md

tests/test_guide.py fails when docs/guide/api.md and this output disagree."""

import inspect

import qat_sadam

HEADER = """# Python API reference

Generated from the docstrings by `python tools/api_reference.py > docs/guide/api.md`; a test fails
when the two disagree. Everything here is importable from `qat_sadam` (`from qat_sadam import
prepare_qat`); [your own model in Python](own-model.md) uses it end to end.
"""


def entry(name: str) -> str:
    obj = getattr(qat_sadam, name)
    target = obj.__init__ if inspect.isclass(obj) else obj
    signature = str(inspect.signature(target)).replace("(self, ", "(").replace("(self)", "()")
    kind = "class" if inspect.isclass(obj) else "def"
    doc = inspect.getdoc(obj) or ""
    return f"## `{name}`\n\n```python\n{kind} {name}{signature}\n```\n\n{doc}\n"


def reference() -> str:
    return HEADER + "\n" + "\n".join(entry(name) for name in qat_sadam.__all__)


if __name__ == "__main__":
    print(reference(), end="")
