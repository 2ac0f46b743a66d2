"""Start from a trained float model: starting points, float training, PTQ, the accuracy ladder."""

import json
import os

import pytest
import safetensors.torch
import torch
import torchvision
import yaml

from qat_sadam.cli import main
from qat_sadam.errors import CheckpointError
from qat_sadam.export.figures import ladder_bars
from qat_sadam.models import build_model
from qat_sadam.quant import FakeQuantize, calibrate, prepare_qat, reestimate_batchnorm
from qat_sadam.train.checkpoint import load_checkpoint
from qat_sadam.train.model import quantize_model
from qat_sadam.train.recipe import Recipe, load_recipe
from qat_sadam.train.trainer import Trainer
from qat_sadam.workflows.sensitivity import sensitivity_recipe

SYNTH = [
    "data.name=synthetic",
    "data.image_size=8",
    "data.batch_size=64",
    "model.name=small_cnn",
    "model.width=8",
    "data.eval_batch_size=256",
    "calibration_batches=1",
]
FLOAT = SYNTH + ["quant={enabled: false}", "epochs=3", "optimizer.lr=0.01"]


def _float_run(tmp_path, name="float"):
    run = tmp_path / name
    Trainer(load_recipe(None, FLOAT, optimizer="adamw"), str(run), progress=False).train()
    return run


def _start(tmp_path, *extra):
    """The float model a recipe starts from, and what was loaded."""
    t = Trainer(
        load_recipe(None, SYNTH + ["quant.bits=4", "epochs=1"] + list(extra), optimizer="adamw"),
        str(tmp_path / "ft"),
        progress=False,
    )
    return t


def test_float_recipe_trains_without_any_quantizer(tmp_path):
    run = _float_run(tmp_path)
    ck = load_checkpoint(str(run / "checkpoints" / "last.pt"))
    assert not any("quant" in k or "scale" in k for k in ck["model"])
    t = Trainer(Recipe.from_saved(ck["recipe"]), str(tmp_path / "again"), progress=False)
    assert not any(isinstance(m, FakeQuantize) for m in t.model.modules())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_acc"] > 0.5  # synthetic templates: learnable in one epoch
    ev = json.loads(
        [line for line in open(run / "metrics.jsonl") if '"epoch"' in line and '"type": "epoch"' in line][-1]
    )
    assert ev["eval_graph"] == "float"


@pytest.mark.parametrize("kind", ["pt", "wrapped", "safetensors", "run_dir"])
def test_each_kind_of_starting_point_loads_the_same_weights(tmp_path, kind):
    run = _float_run(tmp_path)
    sd = load_checkpoint(str(run / "checkpoints" / "last.pt"))["model"]
    path = {
        "run_dir": run,
        "pt": tmp_path / "m.pt",
        "wrapped": tmp_path / "w.pth",
        "safetensors": tmp_path / "m.safetensors",
    }[kind]
    if kind == "pt":
        torch.save(sd, path)
    elif kind == "wrapped":  # how timm and Lightning save: a dict with the state_dict inside, DataParallel prefixes
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    elif kind == "safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    t = _start(tmp_path, f"model.checkpoint={path}", "bn_reestimate_batches=0")  # BatchNorm statistics as saved
    assert t.start["source"] == f"model.checkpoint {path}" and t.start["reset_classifier"] == []
    assert t.start["float_acc"] > 0.5  # measured before any quantizer
    loaded = {k: v for k, v in t.model.state_dict().items() if k in sd}
    assert len(loaded) == len(sd) and all(torch.equal(loaded[k].cpu(), sd[k]) for k in sd)


def test_torchvision_weights_load_through_the_hub_cache(tmp_path, monkeypatch):
    """The real loading path of torchvision's weight enums, with a state_dict this test writes where
    torchvision looks (a temporary TORCH_HOME), and the classifier reset for 10 classes."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(5)
    imagenet = torchvision.models.resnet18(num_classes=1000)
    torch.save(imagenet.state_dict(), cache / os.path.basename(weights.url))
    recipe = [
        "data.name=synthetic",
        "data.image_size=16",
        "data.batch_size=32",
        "model.name=resnet18",
        "quant.bits=8",
        "calibration_batches=1",
        "model.weights=IMAGENET1K_V1",
    ]
    with pytest.raises(CheckpointError, match="trained for 1000 classes, the model has 10 .*model.reset_classifier"):
        Trainer(load_recipe(None, recipe), str(tmp_path / "a"), progress=False)
    t = Trainer(load_recipe(None, recipe + ["model.reset_classifier=true"]), str(tmp_path / "b"), progress=False)
    assert t.start["reset_classifier"] == ["fc.weight", "fc.bias"]
    assert torch.equal(t.model.get_submodule("layer1.0.conv1").weight.cpu(), imagenet.layer1[0].conv1.weight)


def test_uncached_torchvision_weights_name_the_file_and_the_cache_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    code = main(
        [
            "train",
            "quickstart",
            "--out",
            str(tmp_path / "run"),
            "--set",
            "model.name=resnet18",
            "--set",
            "model.weights=IMAGENET1K_V1",
            "--set",
            "data.name=synthetic",
            "--set",
            "export.enabled=false",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert (
        "resnet18-f37072fd.pth is not in the torch hub cache" in err
        and str(tmp_path / "empty" / "hub" / "checkpoints") in err
    )


def test_mismatched_keys_exit_2_naming_them(tmp_path, capsys):
    other = build_model("paper_cnn", 10)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    code = main(
        ["train", "quickstart", "--out", str(tmp_path / "run"), "--set", f"model.checkpoint={tmp_path / 'other.pt'}"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert (
        "does not match the model's keys: 14 missing (stem.0.weight, stem.1.weight" in err
        and "6 unexpected (features.0.weight" in err
    )
    assert not (tmp_path / "run").exists()


def test_a_qat_run_is_refused_as_a_float_starting_point(tmp_path):
    qat = tmp_path / "qat"
    Trainer(
        load_recipe(None, SYNTH + ["quant.bits=4", "epochs=1"], optimizer="adamw"), str(qat), progress=False
    ).train()
    with pytest.raises(CheckpointError, match="is a QAT run; start from a float run"):
        _start(tmp_path, f"model.checkpoint={qat}")


@pytest.mark.parametrize(
    "sets,msg",
    [
        (["quant={enabled: false, bits: 4}"], "'quant.bits' has no effect with quant.enabled: false"),
        (["quant={enabled: false}", "export.enabled=true"], "a float run (quant.enabled: false) has no INT8 model"),
        (["model.checkpoint=/nonexistent.pt"], "no such file or run directory: /nonexistent.pt"),
        (["model.weights=IMAGENET1K_V1"], "'model.weights' applies to torchvision models; 'small_cnn' is not one"),
        (
            ["model.name=resnet18", "model.weights=IMAGENET9K"],
            "resnet18 has no weights 'IMAGENET9K'; choose from IMAGENET1K_V1",
        ),
        (
            ["model.name=mobilenet_v3_small", "model.cifar_stem=true"],
            "applies to resnet18, resnet50, mobilenet_v2, not mobilenet_v3_small",
        ),
        (["distill.enabled=true"], "'distill.enabled' needs a float teacher: a quantized fine-tune that starts from"),
    ],
)
def test_bad_starting_points_are_refused_up_front(tmp_path, capsys, sets, msg):
    argv = ["train", "quickstart", "--out", str(tmp_path / "run")]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("alpha,temperature", [(1.0, 1.0), (0.5, 4.0)])
def test_distillation_loss_is_the_kl_to_the_float_model_it_starts_from(tmp_path, alpha, temperature):
    run = _float_run(tmp_path)
    _start(tmp_path, f"model.checkpoint={run}")
    rng_without = torch.get_rng_state()
    t = _start(
        tmp_path,
        f"model.checkpoint={run}",
        "distill.enabled=true",
        f"distill.alpha={alpha}",
        f"distill.temperature={temperature}",
    )
    assert torch.equal(torch.get_rng_state(), rng_without)  # the teacher leaves the run's random stream as it was
    float_sd = load_checkpoint(str(run / "checkpoints" / "last.pt"))["model"]
    assert all(torch.equal(v, float_sd[k]) for k, v in t.teacher.state_dict().items())
    x, y = next(iter(t.train_loader.batches(0)))
    with torch.no_grad():
        student, teacher = t.model(x), t.teacher(x)
    p_t = torch.softmax(teacher / temperature, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(student / temperature, 1))).sum(1).mean() * temperature**2
    expected = (1 - alpha) * torch.nn.functional.cross_entropy(student, y) + alpha * kl
    loss = t._closure(x, y)()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and kl > 0.01  # 4-bit student != float teacher
    t.optimizer.step(t._closure(x, y))
    assert all(torch.equal(v, float_sd[k]) for k, v in t.teacher.state_dict().items())  # the teacher never trains


def test_mobilenet_v2_cifar_stem_keeps_a_4x4_feature_map():
    m = build_model("mobilenet_v2", 10, cifar_stem=True)
    assert m.features(torch.randn(1, 3, 32, 32)).shape[-2:] == (4, 4)


def test_batchnorm_reestimation_changes_running_statistics_only():
    torch.manual_seed(0)
    model = prepare_qat(build_model("small_cnn", 10), {"bits": 3})
    x = [torch.randn(32, 3, 8, 8) * 2 + 1 for _ in range(4)]
    calibrate(model, x)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = reestimate_batchnorm(model, x)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(
        k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked") for k in changed
    )
    assert report["bn_layers"] == 2 and report["bn_batches"] == 4 and report["bn_mean_error"] > 0.1
    assert not model.training
    # the new statistics are those of the batches, as the quantized model computes them
    bn = model.get_submodule("stem.1")
    with torch.no_grad():
        feats = torch.cat([model.get_submodule("stem.0")(model.activation_quantizers.x(b)) for b in x])
    torch.testing.assert_close(bn.running_mean, feats.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_ptq_then_finetune_ladder_on_digits(tmp_path, capsys):
    """The user's path on built-in data: float -> PTQ -> QAT, at 2 bits where PTQ costs digits 7 points."""
    float_run = tmp_path / "float"
    assert main(["train", "quickstart_float", "--out", str(float_run), "--quiet"]) == 0
    sets = ["--set", f"model.checkpoint={float_run}", "--bits", "2", "--quiet"]
    assert main(["ptq", "quickstart_finetune", "--out", str(tmp_path / "ptq")] + sets) == 0
    ptq = json.loads((tmp_path / "ptq" / "summary.json").read_text())
    assert main(["train", "quickstart_finetune", "--out", str(tmp_path / "ft"), "--set", "epochs=3"] + sets) == 0
    ft = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert {"float_acc", "ptq_acc", "qat_acc", "recovery"} <= set(ft)
    assert ft["ptq_acc"] == ptq["ptq_acc"] and ft["float_acc"] == ptq["float_acc"]  # one PTQ, two ways to get it
    assert 0.2 < ft["ptq_acc"] < ft["qat_acc"] <= ft["float_acc"] + 0.02  # above chance (0.1), below QAT
    assert ft["recovery"] == pytest.approx((ft["qat_acc"] - ft["ptq_acc"]) / (ft["float_acc"] - ft["ptq_acc"]))
    report = json.loads((tmp_path / "ft" / "export" / "validation.json").read_text())
    assert report["ladder"]["qat_acc"] == report["accuracy"]["ort_int8"] == ft["qat_acc"]
    assert ft["final_acc"] == ft["qat_acc"]  # the trainer evaluates what it exports (cpu-x86: 7-bit weights)
    assert "## Accuracy ladder" in (tmp_path / "ft" / "export" / "validation.md").read_text()
    bars = dict(ladder_bars(report))  # ladder.png draws the report's own numbers, float down to each runtime
    assert bars == {
        "float\n(torch)": report["ladder"]["float_acc"],
        "PTQ INT8\n(deployed)": report["ladder"]["ptq_acc"],
        "QAT graph\n(torch)": report["accuracy"]["torch_qat_graph"],
        "QAT INT8\n(deployed)": report["ladder"]["qat_acc"],
        "QAT INT8\non ort-cpu": report["runtimes"]["ort-cpu"]["accuracy"],
    }
    assert (tmp_path / "ft" / "export" / "ladder.png").stat().st_size > 10_000
    assert ft["start"]["bn_reestimate"]["bn_batches"] > 0 and ft["bn_reestimate"]["bn_batches"] > 0


@pytest.fixture(scope="module")
def quickstart_float(tmp_path_factory):
    """A briefly trained float quickstart model: the starting point the sensitivity sweeps quantize."""
    run = tmp_path_factory.mktemp("quickstart") / "float"
    assert main(["train", "quickstart_float", "--out", str(run), "--quiet", "--set", "epochs=2"]) == 0
    return run


def _sweep_settings(float_run, act_bits: int, bits: int) -> list[str]:
    """Every layer at the low width (no 8-bit first/last exception), activations at act_bits."""
    return [
        "--set",
        f"model.checkpoint={float_run}",
        "--set",
        "quant.first_last_bits=null",
        "--set",
        f"quant.act_bits={act_bits}",
        "--bits",
        str(bits),
    ]


def test_activation_sensitivity_ranks_sites_and_proposes_8bit_activations_within_budget(
    quickstart_float, tmp_path, capsys
):
    float_run = quickstart_float
    sets = _sweep_settings(float_run, 2, 4)
    out = tmp_path / "sens"
    assert (
        main(
            [
                "sensitivity",
                "quickstart_finetune",
                "--samples",
                "300",
                "--activations",
                "--act-budget",
                "1.5",
                "--out",
                str(out),
                "--quiet",
            ]
            + sets
        )
        == 0
    )
    res = json.loads((out / "sensitivity.json").read_text())
    r = load_recipe(
        "quickstart_finetune",
        [f"model.checkpoint={float_run}", "quant.first_last_bits=null", "quant.act_bits=2"],
        bits=4,
    )
    model = quantize_model(r, build_model("small_cnn", 10))
    sites = {s["site"]: s for s in res["activation_sites"]}
    assert set(sites) == set(model.activation_site_names.values()) and len(sites) >= 4
    assert all(s["elements"] > 0 for s in sites.values())
    # 2-bit activations cost accuracy, and some single site's 8 bits win a part of it back
    assert res["all_4bit_weights_acc"] < res["all_4bit_weights_8bit_activations_acc"] - 0.05
    assert max(s["drop"] for s in sites.values()) > 0.02 and max(s["gain"] for s in sites.values()) > 0.02
    chosen = [o["pattern"] for o in res["proposal"]["overrides"]]
    assert chosen and all(o == {"pattern": o["pattern"], "act_bits": 8} for o in res["proposal"]["overrides"])
    base = sum(s["elements"] * 2 for s in sites.values())
    assert sum(sites[c]["elements"] * 6 for c in chosen) + base <= 1.5 * base
    # merged, the fragment puts exactly those sites at 8-bit activations
    r = load_recipe(
        "quickstart_finetune",
        [f"model.checkpoint={float_run}", "quant.first_last_bits=null", "quant.act_bits=2"],
        bits=4,
        fragments=[str(out / "mixed_precision.yaml")],
    )
    mixed = quantize_model(r, build_model("small_cnn", 10))
    at8 = {mixed.activation_site_names[k] for k, q in mixed.activation_quantizers.items() if q.spec.bits == 8}
    assert at8 == set(chosen)
    assert "activation site" in (out / "sensitivity.md").read_text()
    capsys.readouterr()
    assert main(["sensitivity", "quickstart_finetune", "--act-budget", "1.2"] + sets) == 2
    assert "--act-budget proposes activation sites: add --activations" in capsys.readouterr().err


def test_recovery_is_a_ratio_only_when_ptq_lost_accuracy():
    from qat_sadam.export.validate import accuracy_ladder, format_ladder

    assert accuracy_ladder({"float_acc": 0.8, "ptq_acc": 0.6, "qat_acc": 0.75}, 100)["recovery"] == pytest.approx(0.75)
    # no ratio where PTQ lost under one sample: the report says so, and "-" where a rung is missing
    tiny = accuracy_ladder({"float_acc": 0.92393, "ptq_acc": 0.92389, "qat_acc": 0.9276}, 512)
    assert format_ladder(tiny)[3] == "- (PTQ lost under one of 512 samples)"
    assert format_ladder(accuracy_ladder({"float_acc": 0.9, "qat_acc": 0.8}, 512))[3] == "-"
    # PTQ at or above float (MobileNetV2 W8A8 here: 72.7 -> 73.1): nothing to recover, no ratio
    assert accuracy_ladder({"float_acc": 0.727, "ptq_acc": 0.731, "qat_acc": 0.749}, 1000)["recovery"] is None
    # PTQ below float by less than one sample of the set (a segmentation ladder's 4e-5 mIoU): no ratio either
    assert accuracy_ladder({"float_acc": 0.92393, "ptq_acc": 0.92389, "qat_acc": 0.9276}, 512)["recovery"] is None
    assert accuracy_ladder({"float_acc": 0.924, "ptq_acc": 0.922, "qat_acc": 0.923}, 512)["recovery"] == pytest.approx(
        0.5
    )


def test_sensitivity_ranks_layers_and_proposes_a_mixed_precision_within_budget(quickstart_float, tmp_path, capsys):
    float_run = quickstart_float
    sets = _sweep_settings(float_run, 8, 2)  # W2A8: three layers to rank
    out = tmp_path / "sens"
    assert (
        main(
            ["sensitivity", "quickstart_finetune", "--samples", "300", "--budget", "1.5", "--out", str(out), "--quiet"]
            + sets
        )
        == 0
    )
    res = json.loads((out / "sensitivity.json").read_text())
    rows = {r["layer"]: r for r in res["layers"]}
    assert set(rows) == {"stem.0", "body.0", "fc"}
    assert res["all_2bit_weights_acc"] < res["all_8bit_weights_acc"] - 0.05  # 2-bit weights cost accuracy
    # activations are 8-bit here already: the "8-bit activations" configuration is the all-2-bit one
    assert res["all_2bit_weights_8bit_activations_acc"] == res["all_2bit_weights_acc"]
    assert max(r["drop"] for r in rows.values()) > 0.02 and max(r["gain"] for r in rows.values()) > 0.02
    chosen = [o["pattern"] for o in res["proposal"]["overrides"]]
    base = sum(r["weights"] * 2 for r in rows.values())
    assert sum(rows[c]["weights"] * 6 for c in chosen) + base <= 1.5 * base
    # the fragment is a valid recipe section: the mixed model prepares with those layers at 8 bits
    frag = yaml.safe_load((out / "mixed_precision.yaml").read_text())
    r = load_recipe(
        "quickstart_finetune",
        [f"model.checkpoint={float_run}", "quant.first_last_bits=null", "quant.act_bits=8"],
        bits=2,
        fragments=[str(out / "mixed_precision.yaml")],
    )
    assert r.quant.overrides == frag["quant"]["overrides"] and r.quant.bits == 2
    assert r.quant.act_bits == 8  # a fragment merges into quant: the recipe's other keys stay
    # a float run directory is a source too: its weights, quantized at --bits
    r = sensitivity_recipe(str(float_run), bits=3)
    assert r.model.checkpoint == str(float_run) and r.quant.bits == 3 and r.quantized
    assert (out / "sensitivity.png").stat().st_size > 5_000
    capsys.readouterr()
    assert main(["sensitivity", "quickstart_finetune", "--budget", "0.9"] + sets) == 2
    assert "--budget is a ratio to uniform low-bit weight storage and must be >= 1" in capsys.readouterr().err
    assert main(["sensitivity", "quickstart_float", "--out", str(tmp_path / "x")]) == 2
    assert "sensitivity needs a quantized recipe that starts from trained weights" in capsys.readouterr().err
    assert main(["train", "quickstart_finetune", "--merge", str(tmp_path / "none.yaml")]) == 2
    assert "recipe fragment file not found" in capsys.readouterr().err
