"""Export a run's checkpoint for a deployment target and validate it; validate a model file."""

from __future__ import annotations

import os
import shutil

import numpy as np
import torch

from ..errors import UserError
from ..export import (
    DEFAULT_TARGET,
    check_model_file,
    export_float_onnx,
    export_onnx,
    float_model,
    fold_check,
    format_report,
    load_target,
    validate,
)
from ..export.outputs import output_list
from ..export.validate import REPORT
from ..train.data import Loader, load_data
from ..train.model import load_run
from ..train.recipe import Recipe
from ..train.run import PTQ, Run


def test_batches(recipe: Recipe, info: dict, samples: int | None, batch: int):
    """The first ``samples`` test images of a run's data (all when None), normalised, in batches."""
    test = load_data(recipe.data).test
    if samples:
        test = type(test)(test.x[:samples], test.y[:samples])
    return Loader(test, batch, info["mean"], info["std"], shuffle=False).batches()


def export_run(
    run: str,
    target: str | None,
    out_dir: str,
    samples: int | None = None,
    data_root: str | None = None,
    ladder: dict | None = None,
    rung: str = "qat_acc",
    runtimes: list[str] | None = None,
    label: str | None = None,
) -> dict:
    """Export a run's deployed checkpoint (or the checkpoint file given) for ``target`` and validate
    it on ORT and on ``runtimes`` (default: the target's); returns the validation report (with the
    accuracy ladder when ``ladder`` gives the rungs below)."""
    loaded = load_run(run, data_root=data_root)
    recipe, info, model = loaded.recipe, loaded.info, loaded.model
    tgt = load_target(target or recipe.export.target or DEFAULT_TARGET)
    batch = tgt.fixed_batch or 64
    batches = [(x, y) for x, y in test_batches(recipe, info, samples, batch) if not tgt.fixed_batch or len(x) == batch]
    rep = export_and_validate(model, batches, tgt, out_dir, ladder=ladder, rung=rung, runtimes=runtimes)
    print((f"{label}\n" if label else "") + format_report(rep, out_dir))
    return rep


def export_and_validate(
    model: torch.nn.Module,
    batches: list,
    target,
    out_dir: str,
    ladder: dict | None = None,
    rung: str = "qat_acc",
    runtimes: list[str] | None = None,
) -> dict:
    """Export a QAT model into ``out_dir`` (model.onnx, float.onnx) for ``target`` and validate the
    file on ``batches`` of (inputs, labels or None): the report `qat-sadam export` renders."""
    tgt = load_target(target)
    example = batches[0][0][:1]
    path = os.path.join(out_dir, "model.onnx")
    done = export_onnx(model, example, path, tgt)
    float_path = export_float_onnx(model, example, os.path.join(out_dir, "float.onnx"), tgt)
    labels = [y for _, y in batches if y is not None]
    rep = validate(
        path,
        target=tgt,
        inputs=[x.numpy() for x, _ in batches],
        labels=np.concatenate([y.numpy() for y in labels]) if len(labels) == len(batches) else None,
        torch_outputs=_outputs(model, batches),
        frozen_outputs=_outputs(done["frozen"], batches),
        integer_outputs=_outputs(done["integer"], batches),
        float_path=float_path,
        out_dir=out_dir,
        ladder=ladder,
        rung=rung,
        runtimes=runtimes,
        frozen=done["frozen"],
        float_torch=float_model(model),
        fold=fold_check(model, batches[0][0]),
        int4_path=done["int4_path"],
    )
    rep["requantized_to_max_bits"] = done["requantized_to_max_bits"]
    return rep


def _outputs(fn, batches) -> list[np.ndarray]:
    """``fn``'s outputs on every batch, each output (in file order) concatenated over the batches."""
    with torch.no_grad():
        per_batch = [[o.numpy() for o in output_list(fn(x))] for x, _ in batches]
    return [np.concatenate(o) for o in zip(*per_batch)]


def export_command(
    run: str,
    target: str | None,
    out_dir: str | None = None,
    samples: int | None = None,
    data_root: str | None = None,
    runtimes: list[str] | None = None,
    force: bool = False,
) -> dict:
    """`qat-sadam export`: export_run into ``out_dir``, by default RUN/export/<target name> (one
    folder per target; RUN/export itself holds the run's own export and its ladder). A folder that
    holds an export already is refused unless ``force``, and replaced only once the new export is
    written (one that fails leaves the old in place); the run directory's lock is held throughout (a
    run still training there, or a second export, makes it exit 2)."""
    owner, checkpoint = Run.locate(run)
    with owner.lock():
        if out_dir is None:
            recipe_target = owner.recipe().get("export", {}).get("target")
            out_dir = os.path.join(owner.export_dir(), load_target(target or recipe_target or DEFAULT_TARGET).name)
        # A fine-tune's float rung (torch, whatever the target) above the run's deployed checkpoint;
        # a checkpoint file named instead (ptq.pt, an early one) is no rung of that ladder.
        summary = owner.read_summary() if checkpoint is None and os.path.isfile(owner.summary_file) else {}
        float_acc = summary.get("start", {}).get("float_acc")
        ladder = {"float_acc": float_acc} if float_acc is not None else None
        previous = None
        if os.path.isfile(os.path.join(out_dir, REPORT)):
            if not force:
                raise UserError(f"{out_dir} holds an export already ({REPORT}): --force replaces it")
            if os.path.realpath(out_dir) == os.path.realpath(owner.dir):
                raise UserError(f"{out_dir} is the run directory: export into a folder of its own")
            previous = out_dir.rstrip(os.sep) + ".replaced"  # kept until the new export is written
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(out_dir, previous)
        try:
            rep = export_run(run, target, out_dir, samples, data_root, ladder=ladder, runtimes=runtimes)
        except BaseException:  # an export that did not finish leaves the one it was to replace
            if previous:
                shutil.rmtree(out_dir, ignore_errors=True)
                os.replace(previous, out_dir)
            raise
        if previous:
            shutil.rmtree(previous)
        return rep


def export_finished_run(run_dir: str, target: str | None) -> dict:
    """Export a finished run into RUN/export and validate it. A fine-tune (a run that started from
    trained weights) also exports its PTQ state into RUN/export-ptq, and both validation reports
    and summary.json carry the accuracy ladder: float, PTQ INT8 and QAT INT8 on ORT, recovery."""
    run = Run(run_dir)
    summary = run.read_summary()
    float_acc = summary.get("start", {}).get("float_acc")
    ladder = None
    if float_acc is not None and run.has_checkpoint(PTQ):
        ptq = export_run(
            run.checkpoint(PTQ),
            target,
            run.export_dir("export-ptq"),
            ladder={"float_acc": float_acc},
            rung="ptq_acc",
            label="PTQ INT8 (the float model calibrated, BatchNorm re-estimated, before the fine-tune):",
        )
        ladder = {"float_acc": float_acc, "ptq_acc": ptq["accuracy"]["deployed"]}
    label = "QAT INT8 (after the fine-tune):" if ladder else None
    rep = export_run(run_dir, target, run.export_dir(), ladder=ladder, label=label)
    if "ladder" in rep:
        run.write_summary({**summary, **rep["ladder"], "qat_checkpoint": os.path.basename(run.deployed_checkpoint())})
    return rep


def validate_model(
    model: str,
    target: str | None = None,
    samples: int | None = None,
    run: str | None = None,
    runtimes: list[str] | None = None,
) -> dict:
    """Validate a model file; with ``run`` (the run it came from) re-export that run beside it for
    torch parity and accuracy on real data, else compare ORT with and without optimizations on
    random inputs."""
    out_dir = os.path.dirname(os.path.abspath(model))
    if run:
        return export_run(run, target, out_dir, samples, runtimes=runtimes)
    m = check_model_file(model)
    shape = [d.dim_value or 8 for d in m.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]
    float_path, int4_path = os.path.join(out_dir, "float.onnx"), os.path.splitext(model)[0] + ".int4.onnx"
    rep = validate(
        model,
        target=target or DEFAULT_TARGET,
        inputs=inputs,
        float_path=float_path if os.path.isfile(float_path) else None,
        runtimes=runtimes,
        int4_path=int4_path if os.path.isfile(int4_path) else None,
    )
    print(
        "no --run given: parity compares ORT with and without graph optimizations on random inputs; "
        "pass --run RUN_DIR for torch parity and accuracy on real data"
    )
    print(format_report(rep, out_dir))
    return rep
