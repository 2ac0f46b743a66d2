"""`qat-sadam ptq`: post-training quantization of a trained float model, exported and validated.

The same quantizers, calibration, BatchNorm re-estimation and exporter as a QAT fine-tune of the
same recipe (the trainer's own start-up), so the PTQ accuracy is the baseline that QAT must beat.
"""
from __future__ import annotations

import os

from ..errors import RecipeError
from ..train.recipe import load_recipe, quantized, starts_trained
from ..train.run_dir import RunLock, write_summary
from ..train.trainer import PTQ_CHECKPOINT, Trainer
from .export_run import export_run
from .train_run import prepare_out


def ptq(recipe_path: str, out: str | None = None, overrides: list[str] = (), bits: int | None = None,
        force: bool = False, progress: bool = True, fragments: list[str] = ()) -> dict:
    """Calibrate the recipe's trained model, export it for the recipe's target and validate it on
    ORT; writes RUN/checkpoints/ptq.pt, RUN/export/ and summary.json (float_acc, ptq_acc)."""
    recipe = load_recipe(recipe_path, overrides, bits=bits, fragments=fragments)
    if not starts_trained(recipe):
        raise RecipeError("ptq needs a trained float model: set model.checkpoint (a state_dict or a float run "
                          "directory) or model.weights (torchvision's)")
    if not quantized(recipe):
        raise RecipeError("ptq of a float recipe (quant.enabled: false): there is nothing to quantize")
    out = out or os.path.join("runs", os.path.splitext(os.path.basename(recipe_path))[0] + "-ptq")
    with RunLock(out):
        prepare_out(out, force)
        trainer = Trainer(recipe, out, progress=progress)  # float accuracy, calibration, BatchNorm re-estimation
        trainer.write_run_files()
        rep = export_run(os.path.join(out, "checkpoints", PTQ_CHECKPOINT), recipe["export"]["target"],
                         os.path.join(out, "export"), ladder={"float_acc": trainer.start["float_acc"]}, rung="ptq_acc")
        summary = {"run_dir": out, "start": trainer.start, "float_acc": trainer.start["float_acc"],
                   "ptq_acc": rep["accuracy"]["ort_int8"], "validation_passed": rep["passed"]}
        write_summary(out, summary)
    print(f"PTQ: float {100 * summary['float_acc']:.2f}% -> INT8 on ORT {100 * summary['ptq_acc']:.2f}%; results: {out}")
    return summary
