"""`qat-sadam ptq`: post-training quantization of a trained float model, exported and validated.

The same pipeline stages as a QAT fine-tune of the same recipe (set-up, starting model,
calibration, BatchNorm re-estimation, exporter; train/pipeline.py) without an optimizer, so the PTQ
accuracy is the baseline that QAT must beat.
"""

from __future__ import annotations

import os

from ..errors import RecipeError
from ..train.checkpoint import save_atomic
from ..train.pipeline import post_training_quantize, setup, start_model
from ..train.recipe import dump_recipe, load_recipe
from ..train.run import PTQ, Run
from .export_run import export_run
from .train_run import prepare_out


def ptq(
    recipe_path: str,
    out: str | None = None,
    overrides: list[str] = (),
    bits: int | None = None,
    force: bool = False,
    progress: bool = True,
    fragments: list[str] = (),
) -> dict:
    """Calibrate the recipe's trained model, export it for the recipe's target and validate it on
    ORT; writes the run's PTQ checkpoint, RUN/export/ and summary.json (float_acc, ptq_acc)."""
    recipe = load_recipe(recipe_path, overrides, bits=bits, fragments=fragments)
    if not recipe.starts_trained:
        raise RecipeError(
            "ptq needs a trained float model: set model.checkpoint (a state_dict or a float run "
            "directory) or model.weights (torchvision's)"
        )
    if not recipe.quantized:
        raise RecipeError("ptq of a float recipe (quant.enabled: false): there is nothing to quantize")
    out = out or os.path.join("runs", os.path.splitext(os.path.basename(recipe_path))[0] + "-ptq")
    run = Run(out)
    with run.lock():
        prepare_out(run, force)
        s = setup(recipe)
        model, start = start_model(recipe, s)  # the float rung
        post_training_quantize(model, recipe, s, start)
        dump_recipe(recipe, run.recipe_file)
        save_atomic(
            {"model": model.state_dict(), "recipe": recipe.to_dict(), "info": s.info, "start": start},
            run.checkpoint(PTQ),
        )
        rep = export_run(
            run.checkpoint(PTQ),
            recipe.export.target,
            run.export_dir(),
            ladder={"float_acc": start["float_acc"]},
            rung="ptq_acc",
        )
        summary = {
            "run_dir": out,
            "start": start,
            "float_acc": start["float_acc"],
            "ptq_acc": rep["accuracy"]["deployed"],
            "validation_passed": rep["passed"],
        }
        run.write_summary(summary)
    print(
        f"PTQ: float {100 * summary['float_acc']:.2f}% -> INT8 on ORT {100 * summary['ptq_acc']:.2f}%; results: {out}"
    )
    return summary
