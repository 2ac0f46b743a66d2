"""`qat-sadam sensitivity`: which layers cost the accuracy at low bit width, and a mixed precision
that fits a size budget.

For each quantized conv/linear of a recipe's trained float model, two post-training measurements
(AIMET's per-layer quant analysis, done on the deployed arithmetic):
- drop: every layer's weights at 8 bits except this one at the low bit width, against all at 8;
- gain: every layer at the low bit width except this one at 8, against all at the low width.
Activations stay at the recipe's bit width (one more configuration, all weights low with 8-bit
activations, says whether the activations rather than the weights carry the loss). Each
configuration is prepared, calibrated on the recipe's calibration batches and scored with the
integer reference (what ORT's integer kernels compute, bit for bit; docs/export.md) on a
validation split held out from the end of the training set, so the test set stays unseen.
BatchNorm is not re-estimated (the same for every configuration).

``--budget R`` proposes ``quant.overrides`` that raise layers to 8-bit weights, highest gain per
added weight bit first, while the weight storage stays within R times uniform low-bit storage.
"""
from __future__ import annotations

import copy
import json
import os

import torch
import yaml
from torch import nn
from tqdm import tqdm

from ..errors import RecipeError
from ..export import freeze, integer_reference
from ..quant import calibrate
from ..train.data import Loader, Split, load_data
from ..train.model import build_float_model, quantize_model
from ..train.recipe import load_recipe, quantized, read_mapping, starts_trained

HIGH = 8


def _splits(recipe: dict, samples: int):
    data = load_data(recipe["data"])
    n = len(data.train.y)
    if samples >= n:
        raise RecipeError(f"--samples {samples}: the training set has only {n} images to hold a split out of")
    val = Split(data.train.x[n - samples:], data.train.y[n - samples:])
    info = {"num_classes": data.num_classes, "in_channels": data.in_channels, "image_size": data.image_size}
    bs = recipe["data"]["batch_size"]
    calib = Loader(Split(data.train.x[:n - samples], data.train.y[:n - samples]), bs, data.mean, data.std,
                   shuffle=True, seed=recipe["seed"])
    return info, [x for x, _ in list(calib.batches(0))[:recipe["calibration_batches"]]], \
        list(Loader(val, 256, data.mean, data.std, shuffle=False).batches())


def _deployed_accuracy(recipe: dict, float_model: nn.Module, weight_bits: dict, calib, val) -> float:
    r = copy.deepcopy(recipe)
    r["quant"]["overrides"] = list(r["quant"].get("overrides") or []) + [
        {"pattern": name, "weight_bits": b} for name, b in weight_bits.items()]
    model = quantize_model(r, copy.deepcopy(float_model))
    calibrate(model, calib)
    frozen, _ = freeze(model.eval())
    integer = integer_reference(frozen)
    hits = n = 0
    with torch.no_grad():
        for x, y in val:
            hits += int((integer(x).argmax(1) == y).sum())
            n += len(y)
    return hits / n


def _layers(recipe: dict, float_model: nn.Module) -> dict[str, int]:
    """The quantized conv/linear layers at the recipe's low bit width (first/last stay 8): name -> weights."""
    model = quantize_model(recipe, copy.deepcopy(float_model))
    return {name: m.weight.numel() for name, m in model.named_modules()
            if hasattr(m, "weight_quant") and m.weight_quant.spec.bits < HIGH}


def propose(rows: list[dict], low: int, budget: float) -> list[dict]:
    """Layers raised to 8-bit weights, best gain per added bit first, within ``budget`` x uniform storage
    (counted over the layers the sweep covers)."""
    base = sum(r["weights"] * low for r in rows)
    limit, used, chosen = budget * base, base, []
    for r in sorted(rows, key=lambda r: -r["gain"] / (r["weights"] * (HIGH - low))):
        extra = r["weights"] * (HIGH - low)
        if r["gain"] > 0 and used + extra <= limit:
            used += extra
            chosen.append({"pattern": r["layer"], "weight_bits": HIGH})
    return chosen


def sensitivity_recipe(source: str, overrides: list[str] = (), bits: int | None = None) -> dict:
    """The recipe a sensitivity sweep runs: a recipe file; or a run directory, whose own recipe is
    used (a QAT fine-tune's: the float model it started from), or, for a float run, the run's model
    and data with quantizers at ``bits`` and its trained weights as the starting point."""
    if not os.path.isdir(source):
        return load_recipe(source, overrides, bits=bits)
    path = os.path.join(source, "recipe.yaml")
    if not os.path.isfile(path):
        raise RecipeError(f"{source}: not a run directory (no recipe.yaml) and not a recipe file")
    base = read_mapping(path, "run recipe")
    if not isinstance(base.get("model"), dict):
        raise RecipeError(f"{path}: not a run's recipe (a YAML mapping with a model section)")
    if not quantized(base):  # a float run: its trained weights are what gets quantized
        base["quant"] = {}
        base["model"].update(checkpoint=source, weights=None)
    return load_recipe(None, overrides, bits=bits, base=base)


def sensitivity(source: str, out: str, overrides: list[str] = (), bits: int | None = None, samples: int = 1000,
                budget: float | None = None, progress: bool = True) -> dict:
    recipe = sensitivity_recipe(source, overrides, bits)
    if not starts_trained(recipe) or not quantized(recipe):
        raise RecipeError("sensitivity needs a quantized recipe that starts from trained weights (model.checkpoint or "
                          "model.weights): per-layer drops of an untrained network mean nothing")
    low = recipe["quant"].get("weight_bits", recipe["quant"].get("bits"))
    if not low or low >= HIGH:
        raise RecipeError(f"sensitivity compares layers below {HIGH} bits: give --bits (2 to 7)")
    info, calib, val = _splits(recipe, samples)
    float_model, _ = build_float_model(recipe, info)
    float_model.eval()
    layers = _layers(recipe, float_model)
    all_high = _deployed_accuracy(recipe, float_model, {n: HIGH for n in layers}, calib, val)
    all_low = _deployed_accuracy(recipe, float_model, {}, calib, val)
    # where the loss is: the weights are what --budget trades; 8-bit activations are a different trade
    act_high = copy.deepcopy(recipe)
    act_high["quant"]["act_bits"] = HIGH
    acts_8bit = _deployed_accuracy(act_high, float_model, {}, calib, val)
    rows = []
    for name in tqdm(layers, desc="layers", disable=None if progress else True):
        only_low = _deployed_accuracy(recipe, float_model, {n: HIGH for n in layers if n != name}, calib, val)
        only_high = _deployed_accuracy(recipe, float_model, {name: HIGH}, calib, val)
        rows.append({"layer": name, "weights": layers[name], "drop": all_high - only_low, "gain": only_high - all_low})
    os.makedirs(out, exist_ok=True)
    result = {"source": source, "low_bits": low, "validation_samples": samples, "all_8bit_weights_acc": all_high,
              f"all_{low}bit_weights_acc": all_low, f"all_{low}bit_weights_8bit_activations_acc": acts_8bit, "layers": rows}
    if budget is not None:
        chosen = propose(rows, low, budget)
        mixed = _deployed_accuracy(recipe, float_model, {o["pattern"]: HIGH for o in chosen}, calib, val)
        result["proposal"] = {"budget": budget, "overrides": chosen, "acc": mixed}
        with open(os.path.join(out, "mixed_precision.yaml"), "w") as f:
            f.write(f"# qat-sadam sensitivity --budget {budget}: {len(chosen)} layers at 8-bit weights; PTQ accuracy on "
                    f"the validation split {100 * mixed:.2f}% vs {100 * all_low:.2f}% uniform.\n"
                    f"# Fine-tune with it: qat-sadam train RECIPE --bits {low} --merge {os.path.join(out, 'mixed_precision.yaml')}\n")
            yaml.safe_dump({"quant": {"overrides": chosen}}, f, sort_keys=False)
    with open(os.path.join(out, "sensitivity.json"), "w") as f:
        json.dump(result, f, indent=2)
    _write_table(result, os.path.join(out, "sensitivity.md"))
    _plot(result, os.path.join(out, "sensitivity.png"))
    print(open(os.path.join(out, "sensitivity.md")).read())
    print(f"results: {out}")
    return result


def _write_table(res: dict, path: str) -> None:
    low = res["low_bits"]
    L = [f"PTQ accuracy on {res['validation_samples']} held-out training images (integer reference = ORT): all weights "
         f"8-bit {100 * res['all_8bit_weights_acc']:.2f}%, all {low}-bit {100 * res[f'all_{low}bit_weights_acc']:.2f}%; "
         f"all {low}-bit with 8-bit activations {100 * res[f'all_{low}bit_weights_8bit_activations_acc']:.2f}%.", "",
         f"| layer | weights | drop: only this layer at {low} bits | gain: only this layer at 8 bits |", "|---|---|---|---|"]
    L += [f"| {r['layer']} | {r['weights']} | {100 * r['drop']:+.2f} | {100 * r['gain']:+.2f} |"
          for r in sorted(res["layers"], key=lambda r: -r["drop"])]
    all_low, n = res[f"all_{low}bit_weights_acc"], res["validation_samples"]
    L += ["", f"Where the loss is: 8-bit weights everywhere recover {100 * (res['all_8bit_weights_acc'] - all_low):+.2f} "
          f"points, 8-bit activations everywhere {100 * (res[f'all_{low}bit_weights_8bit_activations_acc'] - all_low):+.2f}. "
          f"One accuracy on {n} images has a standard error of {100 * (all_low * (1 - all_low) / n) ** 0.5:.1f} points."]
    if "proposal" in res:
        p = res["proposal"]
        L += ["", f"Proposal within {p['budget']:g}x uniform {low}-bit weight storage: "
              f"{', '.join(o['pattern'] for o in p['overrides']) or 'no layer'} at 8 bits -> {100 * p['acc']:.2f}% "
              "(mixed_precision.yaml)."]
        if p["acc"] <= all_low:
            L.append(f"The proposal does not beat uniform {low}-bit weights on this split: the per-layer gains it was "
                     "built from are within the split's noise (more --samples, or raise activations instead).")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


def _plot(res: dict, path: str) -> None:
    import matplotlib  # paid only when the plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["layers"]
    fig, ax = plt.subplots(figsize=(max(8, 0.35 * len(rows)), 5))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [100 * r["drop"] for r in rows], 0.4, label=f"drop: only this layer at {res['low_bits']} bits")
    ax.bar([i + 0.2 for i in x], [100 * r["gain"] for r in rows], 0.4, label="gain: only this layer at 8 bits")
    ax.set_xticks(list(x), [r["layer"] for r in rows], rotation=90, fontsize=7)
    ax.set(ylabel="accuracy points (PTQ, integer reference)", title="per-layer weight sensitivity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
