"""The recipes and target profiles shipped with the package (package data), addressable by name.

A reference is a name when it has no path separator and no .yaml suffix (``quickstart``,
``mobile-arm``): it names a file of this folder, wherever the command runs. Anything else is a
path, read as given. There is no fallback from one to the other: a name that is not shipped is an
error that lists the shipped ones.
"""

from __future__ import annotations

import os

import yaml

from ..errors import RecipeError, ValidationError

FOLDER = os.path.dirname(os.path.abspath(__file__))
KINDS = {"recipe": ("recipes", RecipeError), "target": ("targets", ValidationError)}
SUFFIXES = (".yaml", ".yml")


def is_name(ref: str) -> bool:
    """Whether ``ref`` names a shipped file rather than giving a path."""
    return "/" not in ref and os.sep not in ref and not ref.endswith(SUFFIXES)


def names(kind: str) -> list[str]:
    """The shipped recipes or targets, by name, sorted."""
    folder = os.path.join(FOLDER, KINDS[kind][0])
    return sorted(f[: -len(".yaml")] for f in os.listdir(folder) if f.endswith(".yaml"))


def resolve(kind: str, ref: str) -> str:
    """The file a recipe or target reference means: a shipped one by name, else the path itself.

    Raises the kind's UserError (RecipeError, ValidationError) for a name that is not shipped."""
    if not is_name(ref):
        return ref
    folder, error = KINDS[kind]
    path = os.path.join(FOLDER, folder, f"{ref}.yaml")
    if not os.path.isfile(path):
        raise error(
            f"no {kind} named {ref!r} ships with qat-sadam (shipped: {', '.join(names(kind))}); "
            f"give a path to a YAML file for your own"
        )
    return path


def describe(kind: str, name: str, width: int = 100) -> str:
    """A shipped file's first sentence (cut to ``width``): from its leading comment, else its ``description`` key."""
    with open(resolve(kind, name), encoding="utf-8") as f:
        text = f.read()
    comment = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("# ").strip())
    first = " ".join(comment) or str((yaml.safe_load(text) or {}).get("description", ""))
    first = first.strip().split(". ")[0].rstrip(".")
    return first if len(first) <= width else first[: width - 3].rsplit(" ", 1)[0] + " ..."
