"""The files of a run directory: recipe.yaml, metrics.jsonl, checkpoints/, summary.json."""
from __future__ import annotations

import json
import os

import yaml

RUN_FILES = {"recipe.yaml", "metrics.jsonl", "checkpoints"}


def summary_path(run_dir: str) -> str:
    return os.path.join(run_dir, "summary.json")


def read_summary(run_dir: str) -> dict:
    with open(summary_path(run_dir)) as f:
        return json.load(f)


def write_summary(run_dir: str, summary: dict) -> None:
    """Written to a temporary file, then renamed over summary.json: a reader never sees half of it."""
    tmp = summary_path(run_dir) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, summary_path(run_dir))


def run_recipe(run_dir: str) -> dict:
    """The recipe a run was trained with (its recipe.yaml)."""
    with open(os.path.join(run_dir, "recipe.yaml")) as f:
        return yaml.safe_load(f)
