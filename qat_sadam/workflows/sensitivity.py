"""`qat-sadam sensitivity`: which layers cost the accuracy at low bit width, and a mixed precision
that fits a size budget.

For each quantized conv/linear of a recipe's trained float model, two post-training measurements
(AIMET's per-layer quant analysis, done on the deployed arithmetic):
- drop: every layer's weights at 8 bits except this one at the low bit width, against all at 8;
- gain: every layer at the low bit width except this one at 8, against all at the low width.
Activations stay at the recipe's bit width (one more configuration, all weights low with 8-bit
activations, says whether the activations rather than the weights carry the loss). Each
configuration is prepared, calibrated on the recipe's calibration batches and scored with the
integer reference (what ORT's integer kernels compute, bit for bit; docs/guide/export.md) on a
validation split held out from the end of the training set, so the test set stays unseen.
BatchNorm is not re-estimated (the same for every configuration).

``--budget R`` proposes ``quant.overrides`` that raise layers to 8-bit weights, highest gain per
added weight bit first, while the weight storage stays within R times uniform low-bit storage.

``--activations`` sweeps the activation quantizers the same way (weights at the low width
throughout: drop against all activations at 8 bits, gain against all low), and ``--act-budget R``
proposes sites to keep at 8-bit activations within R times the uniform low-bit activation storage
(values per image at the recipe's input size). On ORT CPU activations live in uint8 whatever their
bit width, so what this trades is storage and bandwidth on runtimes with narrower activations.
"""

from __future__ import annotations

import copy
import glob
import json
import os

import torch
import yaml
from torch import nn
from tqdm import tqdm

from ..errors import RecipeError
from ..export import freeze, integer_reference
from ..metrics import Score
from ..quant import calibrate
from ..train.data import Loader, Split, load_data
from ..train.model import build_float_model, quantize_model
from ..train.recipe import Recipe, load_recipe, read_mapping
from ..train.run import Run

HIGH = 8


def _splits(recipe: Recipe, samples: int):
    data = load_data(recipe.data)
    n = len(data.train.y)
    if samples >= n:
        raise RecipeError(f"--samples {samples}: the training set has only {n} images to hold a split out of")
    val = Split(data.train.x[n - samples :], data.train.y[n - samples :])
    info = {"num_classes": data.num_classes, "in_channels": data.in_channels, "image_size": data.image_size}
    bs = recipe.data.batch_size
    calib = Loader(
        Split(data.train.x[: n - samples], data.train.y[: n - samples]),
        bs,
        data.mean,
        data.std,
        shuffle=True,
        seed=recipe.seed,
    )
    return (
        info,
        [x for x, _ in list(calib.batches(0))[: recipe.calibration_batches]],
        list(Loader(val, 256, data.mean, data.std, shuffle=False).batches()),
    )


def _raised(names, kind: str = "weight_bits") -> list[dict]:
    """quant.overrides putting the weights (or the activations, kind="act_bits") of ``names`` at 8 bits."""
    return [{"pattern": glob.escape(name), kind: HIGH} for name in names]


def _deployed_accuracy(recipe: Recipe, float_model: nn.Module, overrides: list[dict], calib, val) -> float:
    r = copy.deepcopy(recipe)
    r.quant.overrides = list(r.quant.overrides) + overrides
    model = quantize_model(r, copy.deepcopy(float_model))
    calibrate(model, calib)
    frozen, _ = freeze(model.eval())
    integer = integer_reference(frozen)
    s = Score()
    with torch.no_grad():
        for x, y in val:
            s.update(integer(x), y)
    return s.value()


def _layers(recipe: Recipe, float_model: nn.Module) -> dict[str, int]:
    """The quantized conv/linear layers at the recipe's low bit width (first/last stay 8): name -> weights."""
    model = quantize_model(recipe, copy.deepcopy(float_model))
    return {
        name: m.weight.numel()
        for name, m in model.named_modules()
        if hasattr(m, "weight_quant") and m.weight_quant.spec.bits < HIGH
    }


def _activation_sites(recipe: Recipe, float_model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """The activation quantizers at the recipe's low bit width: site name -> values per image."""
    model = quantize_model(recipe, copy.deepcopy(float_model)).eval()
    sizes, hooks = {}, []

    def record(name):
        def hook(module, inputs, out):
            sizes[name] = out[0].numel()

        return hook

    for key, q in model.activation_quantizers.items():
        if q.spec.bits < HIGH:
            hooks.append(q.register_forward_hook(record(model.activation_site_names[key])))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return sizes


def propose(
    rows: list[dict], low: int, budget: float, name: str = "layer", size: str = "weights", kind: str = "weight_bits"
) -> list[dict]:
    """Rows raised to 8 bits (weights, or activations with name="site", size="elements",
    kind="act_bits"), best gain per added bit first, within ``budget`` x the uniform low-bit storage
    of what the sweep covers."""
    base = sum(r[size] * low for r in rows)
    limit, used, chosen = budget * base, base, []
    for r in sorted(rows, key=lambda r: -r["gain"] / (r[size] * (HIGH - low))):
        extra = r[size] * (HIGH - low)
        if r["gain"] > 0 and used + extra <= limit:
            used += extra
            chosen.append(r[name])
    return _raised(chosen, kind)


def sensitivity_recipe(source: str, overrides: list[str] = (), bits: int | None = None) -> Recipe:
    """The recipe a sensitivity sweep runs: a recipe file; or a run directory, whose own recipe is
    used (a QAT fine-tune's: the float model it started from), or, for a float run, the run's model
    and data with quantizers at ``bits`` and its trained weights as the starting point."""
    if not os.path.isdir(source):
        return load_recipe(source, overrides, bits=bits)
    path = Run(source).recipe_file
    if not os.path.isfile(path):
        raise RecipeError(f"{source}: not a run directory (no recipe.yaml) and not a recipe file")
    base = read_mapping(path, "run recipe")
    if not isinstance(base.get("model"), dict):
        raise RecipeError(f"{path}: not a run's recipe (a YAML mapping with a model section)")
    if not Recipe.from_saved(base).quantized:  # a float run: its trained weights are what gets quantized
        base["quant"] = {}
        base["model"].update(checkpoint=source, weights=None)
    return load_recipe(None, overrides, bits=bits, base=base)


def sensitivity(
    source: str,
    out: str,
    overrides: list[str] = (),
    bits: int | None = None,
    samples: int = 1000,
    budget: float | None = None,
    progress: bool = True,
    activations: bool = False,
    act_budget: float | None = None,
) -> dict:
    recipe = sensitivity_recipe(source, overrides, bits)
    if not recipe.starts_trained or not recipe.quantized:
        raise RecipeError(
            "sensitivity needs a quantized recipe that starts from trained weights (model.checkpoint or "
            "model.weights): per-layer drops of an untrained network mean nothing"
        )
    q = recipe.quant
    low = q.weight_bits if q.weight_bits is not None else q.bits
    if not low or low >= HIGH:
        raise RecipeError(f"sensitivity compares layers below {HIGH} bits: give --bits (2 to 7)")
    act_low = q.act_bits or q.bits
    info, calib, val = _splits(recipe, samples)
    float_model, _ = build_float_model(recipe, info)
    float_model.eval()
    layers = _layers(recipe, float_model)
    acts = _activation_sites(recipe, float_model, calib[0][:1]) if activations else {}

    def score(extra):
        return _deployed_accuracy(recipe, float_model, extra, calib, val)

    all_high, all_low = score(_raised(layers)), score([])
    # where the loss is: the weights are what --budget trades; 8-bit activations are a different trade
    act_high = copy.deepcopy(recipe)
    act_high.quant.act_bits = HIGH
    acts_8bit = _deployed_accuracy(act_high, float_model, [], calib, val)
    bar = {"disable": None if progress else True}
    rows = [
        {
            "layer": name,
            "weights": layers[name],
            "drop": all_high - score(_raised([n for n in layers if n != name])),
            "gain": score(_raised([name])) - all_low,
        }
        for name in tqdm(layers, desc="layers", **bar)
    ]
    # activation sites, weights low throughout: drop against all activations at 8 bits, gain against all low
    act_rows = [
        {
            "site": site,
            "elements": acts[site],
            "drop": acts_8bit - score(_raised([a for a in acts if a != site], "act_bits")),
            "gain": score(_raised([site], "act_bits")) - all_low,
        }
        for site in tqdm(acts, desc="activations", **bar)
    ]
    os.makedirs(out, exist_ok=True)
    result = {
        "source": source,
        "low_bits": low,
        "validation_samples": samples,
        "all_8bit_weights_acc": all_high,
        f"all_{low}bit_weights_acc": all_low,
        f"all_{low}bit_weights_8bit_activations_acc": acts_8bit,
        "layers": rows,
    }
    if activations:
        result.update(act_low_bits=act_low, activation_sites=act_rows)
    chosen = propose(rows, low, budget) if budget is not None else []
    act_chosen = (
        propose(act_rows, act_low, act_budget, "site", "elements", "act_bits") if act_budget is not None else []
    )
    if budget is not None or act_budget is not None:
        mixed = score(chosen + act_chosen)
        result["proposal"] = {
            "budget": budget,
            "act_budget": act_budget,
            "overrides": chosen + act_chosen,
            "acc": mixed,
        }
        with open(os.path.join(out, "mixed_precision.yaml"), "w") as f:
            flags = " ".join(
                f"{k} {v}" for k, v in (("--budget", budget), ("--act-budget", act_budget)) if v is not None
            )
            f.write(
                f"# qat-sadam sensitivity {flags}: {len(chosen)} layers at 8-bit "
                f"weights, {len(act_chosen)} sites at 8-bit activations; PTQ accuracy on the validation split "
                f"{100 * mixed:.2f}% vs {100 * all_low:.2f}% uniform.\n"
                f"# Fine-tune with it: qat-sadam train RECIPE --bits {low} --merge "
                f"{os.path.join(out, 'mixed_precision.yaml')}\n"
            )
            yaml.safe_dump({"quant": {"overrides": chosen + act_chosen}}, f, sort_keys=False)
    with open(os.path.join(out, "sensitivity.json"), "w") as f:
        json.dump(result, f, indent=2)
    _write_table(result, os.path.join(out, "sensitivity.md"))
    _plot(result, os.path.join(out, "sensitivity.png"))
    print(open(os.path.join(out, "sensitivity.md")).read())
    print(f"results: {out}")
    return result


def _write_table(res: dict, path: str) -> None:
    low = res["low_bits"]
    L = [
        f"PTQ accuracy on {res['validation_samples']} held-out training images (integer reference = ORT): all weights "
        f"8-bit {100 * res['all_8bit_weights_acc']:.2f}%, all {low}-bit {100 * res[f'all_{low}bit_weights_acc']:.2f}%; "
        f"all {low}-bit with 8-bit activations {100 * res[f'all_{low}bit_weights_8bit_activations_acc']:.2f}%.",
        "",
        f"| layer | weights | drop: only this layer at {low} bits | gain: only this layer at 8 bits |",
        "|---|---|---|---|",
    ]
    L += [
        f"| {r['layer']} | {r['weights']} | {100 * r['drop']:+.2f} | {100 * r['gain']:+.2f} |"
        for r in sorted(res["layers"], key=lambda r: -r["drop"])
    ]
    all_low, n = res[f"all_{low}bit_weights_acc"], res["validation_samples"]
    L += [
        "",
        f"Where the loss is: 8-bit weights everywhere recover {100 * (res['all_8bit_weights_acc'] - all_low):+.2f} "
        "points, 8-bit activations everywhere "
        f"{100 * (res[f'all_{low}bit_weights_8bit_activations_acc'] - all_low):+.2f}. "
        f"One accuracy on {n} images has a standard error of {100 * (all_low * (1 - all_low) / n) ** 0.5:.1f} points.",
    ]
    if "proposal" in res:
        p = res["proposal"]
        within = [f"{p['budget']:g}x uniform {low}-bit weight storage"] if p["budget"] is not None else []
        within += (
            [f"{p['act_budget']:g}x uniform {res['act_low_bits']}-bit activation storage"]
            if p["act_budget"] is not None
            else []
        )
        raised = [f"{o['pattern']} ({'weights' if 'weight_bits' in o else 'activations'})" for o in p["overrides"]]
        L += [
            "",
            f"Proposal within {' and '.join(within)}: {', '.join(raised) or 'nothing'} at 8 bits -> "
            f"{100 * p['acc']:.2f}% (mixed_precision.yaml).",
        ]
        if p["acc"] <= all_low:
            L.append(
                f"The proposal does not beat uniform {low}-bit weights on this split: the per-layer gains it was "
                "built from are within the split's noise (more --samples, or raise activations instead)."
            )
    if "activation_sites" in res:
        L += [
            "",
            f"| activation site | values per image | drop: only this site at {res['act_low_bits']} bits | gain: only "
            "this site at 8 bits |",
            "|---|---|---|---|",
        ]
        L += [
            f"| {r['site']} | {r['elements']} | {100 * r['drop']:+.2f} | {100 * r['gain']:+.2f} |"
            for r in sorted(res["activation_sites"], key=lambda r: -r["drop"])
        ]
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


def _plot(res: dict, path: str) -> None:
    import matplotlib  # paid only when the plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("layers", "layer", "layer", "weight", res["low_bits"])] + (
        [("activation_sites", "site", "site", "activation", res["act_low_bits"])] if res.get("activation_sites") else []
    )
    width = max(8, 0.35 * max(len(res[key]) for key, *_ in panels))
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 5 * len(panels)), squeeze=False)
    for ax, (key, name, what, kind, low) in zip(axes[:, 0], panels):
        rows = res[key]
        x = range(len(rows))
        ax.bar(
            [i - 0.2 for i in x], [100 * r["drop"] for r in rows], 0.4, label=f"drop: only this {what} at {low} bits"
        )
        ax.bar([i + 0.2 for i in x], [100 * r["gain"] for r in rows], 0.4, label=f"gain: only this {what} at 8 bits")
        ax.set_xticks(list(x), [r[name] for r in rows], rotation=90, fontsize=7)
        ax.set(ylabel="accuracy points (PTQ, integer reference)", title=f"per-{what} {kind} sensitivity")
        ax.axhline(0, color="k", lw=0.5)
        ax.legend()
        if not any(r["gain"] > 0 for r in rows):  # all bars at or below zero read as an empty chart
            ax.text(
                0.5,
                0.5,
                f"no {what} gains: none at 8 bits alone scores above the model at {low} bits",
                ha="center",
                va="center",
                transform=ax.transAxes,
                bbox={"facecolor": "white", "alpha": 0.8},
            )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
