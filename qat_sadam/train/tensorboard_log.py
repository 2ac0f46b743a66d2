"""TensorBoard logging of a run (``RUN/tensorboard``), beside metrics.jsonl: per step loss, lr, rho,
damping, weight flips and oscillation frequency; per epoch the test accuracy and the ladder's
rungs; per quantizer its step size at the end of each epoch; the recipe as text.

``logging.tensorboard``: null (default) logs when the tensorboard package is installed and says in
one line how to enable it when not; true requires it (a recipe error without it); false never logs.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import yaml
from torch import nn

from ..errors import RecipeError
from ..quant import FakeQuantize

INSTALL = "pip install tensorboard (or: make venv)"
STEP_KEYS = (
    "loss",
    "lr",
    "rho",
    "damping",
    "flips",
    "oscillations",
    "osc_freq_mean",
    "dampening_weight",
    "freeze_threshold",
    "frozen_frac",
)
EPOCH_KEYS = ("test_acc", "test_loss", "train_loss", "test_acc_before_bn_reestimate", "mean_damping")
LADDER_KEYS = ("float_acc", "ptq_acc")


class TensorBoardLog:
    def __init__(self, run_dir: str, recipe, first_step: int = 0, enabled: bool = True):
        self.writer = None
        setting = recipe.logging.tensorboard
        if not enabled or setting is False:
            return
        if importlib.util.find_spec("tensorboard") is None:
            if setting:
                raise RecipeError(
                    f"logging.tensorboard: true, but the tensorboard package is not installed ({INSTALL})"
                )
            print(
                f"note: TensorBoard logging is off: the tensorboard package is not installed ({INSTALL})",
                file=sys.stderr,
            )
            return
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when it is there

        # purge_step: a resumed run overwrites what the interrupted one logged after its checkpoint
        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=first_step or None)
        if not first_step:
            self.writer.add_text("recipe", "```\n" + yaml.safe_dump(recipe.to_dict(), sort_keys=False) + "```")

    def record(self, rec: dict) -> None:
        if self.writer is None:
            return
        kind, keys = {"step": ("train", STEP_KEYS), "epoch": ("eval", EPOCH_KEYS)}.get(rec["type"], (None, ()))
        x = rec["step"] if rec["type"] == "step" else rec.get("epoch")
        for k in keys:
            if isinstance(rec.get(k), (int, float)):
                self.writer.add_scalar(f"{kind}/{k}", rec[k], x)

    def ladder(self, start: dict) -> None:
        for k in LADDER_KEYS:
            if self.writer is not None and isinstance(start.get(k), float):
                self.writer.add_scalar(f"ladder/{k}", start[k], 0)

    def scales(self, model: nn.Module, epoch: int) -> None:
        """Each quantizer's step size (the mean over channels for per-channel weights)."""
        if self.writer is None:
            return
        for name, q in model.named_modules():
            if isinstance(q, FakeQuantize) and q.is_initialized:
                self.writer.add_scalar(f"scale/{q.kind}/{name}", float(q.step_size().float().mean()), epoch)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
