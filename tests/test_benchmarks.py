"""Every benchmark of tools/benchmarks runs end to end on a tiny model and prints its table: a
renamed option, a changed report key or a broken code path fails here, not in the next study.

The scripts run in this process (``runpy``, as ``python tools/benchmarks/X.py ...`` would): a process
start costs seconds of imports each. The ones that start processes themselves (torchrun, one
process per toolkit) do so here too. Sizes are the smallest each script accepts; the numbers they
print are not looked at beyond their shape (the benchmarks themselves are run by hand, docs/studies/)."""

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from qat_sadam.cli import main
from qat_sadam.quant.kernels import use_fused_kernels

BENCH = Path(__file__).resolve().parents[1] / "tools" / "benchmarks"


def _bench(monkeypatch, capsys, script: str, *args: str) -> str:
    """Run tools/benchmarks/``script`` with ``args`` as its command line; returns what it printed."""
    monkeypatch.setattr(sys, "argv", [str(BENCH / script), *args])
    monkeypatch.syspath_prepend(str(BENCH))  # a benchmark may import its neighbour
    runpy.run_path(str(BENCH / script), run_name="__main__")
    return capsys.readouterr().out


def _table_rows(out: str, first_cell: str) -> list[list[str]]:
    """The cells of each markdown table row whose first cell starts with ``first_cell``."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    return [r for r in rows if r[0].startswith(first_cell) and set(r[0]) != {"-"}]


@pytest.fixture(autouse=True)
def _eager_kernels():
    """The eager fake-quant ops: building the fused kernels costs a minute per model here, and they
    have their own tests (test_train.py); conftest switches them back on after each test."""
    use_fused_kernels(False)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """A CIFAR-100 stand-in in the shipped npz layout: 200 training and 40 test images of noise."""
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    for name, n in (("cifar100_train_part1", 100), ("cifar100_train_part2", 100), ("cifar100_test", 40)):
        x = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
        np.savez(root / f"{name}.npz", x=x, y=(np.arange(n) % 100).astype(np.uint8))
    return root


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A quickstart run (digits, W4A4) of 4 steps, trained in this process."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    use_fused_kernels(False)
    sets = ["max_steps=4", "export.enabled=false", "calibration_batches=1", "model.width=8", "fake_quant_kernels=eager"]
    assert main(["train", "quickstart", "--out", str(run), "--quiet"] + [a for s in sets for a in ("--set", s)]) == 0
    return run


def test_bench_optimizer_times_each_optimizer_against_adamw(monkeypatch, capsys):
    args = ["--model", "small_cnn", "--batch", "2", "--steps", "1", "--rounds", "1"]
    out = _bench(monkeypatch, capsys, "bench_optimizer.py", *args)
    rows = _table_rows(out, "adamw") + _table_rows(out, "sadam")
    assert [r[0] for r in rows] == ["adamw", "sadam (defaults)", "sadam reference (k=2)", "sadam reference (k=8)"]
    assert rows[0][2] == "1.00x" and all(float(r[1]) > 0 for r in rows)


def test_bench_export_puts_our_file_beside_ort_quantize_static(monkeypatch, capsys, tiny_run):
    args = ["--run", str(tiny_run), "--rounds", "1", "--calib-batches", "1"]
    out = _bench(monkeypatch, capsys, "bench_export.py", *args)
    rows = {r[0]: r for r in _table_rows(out, "")[1:]}
    assert set(rows) == {"float (QAT weights, no quantizers)", "ours: QAT INT8", "ORT quantize_static INT8 of it"}
    assert rows["float (QAT weights, no quantizers)"][5] == "1.00"


def test_bench_training_cost_times_cells_against_the_float_step(monkeypatch, capsys):
    fused = ["QAT W8A8 adamw (LSQ)", "QAT W4A4 adamw (LSQ)", "QAT W4A4 adamw (observer)"]
    fused += ["QAT W4A4 sadam (defaults)", "QAT W4A4 sadam (probe_every 8)"]
    args = ["--model", "small_cnn", "--batch", "2", "--rounds", "1", "--skip", *fused]
    rows = _table_rows(_bench(monkeypatch, capsys, "bench_training_cost.py", *args), "")[1:]
    assert [r[0] for r in rows] == ["float adamw", "QAT W4A4 adamw (LSQ, eager kernels)"]
    assert rows[0][3] == "1.00x" and float(rows[1][3].rstrip("x")) > 0


def test_bench_ddp_times_a_run_under_torchrun(monkeypatch, capsys, cifar, tmp_path):
    monkeypatch.setenv("QAT_SADAM_DATA", str(cifar))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tiny = ["model.widths=[8, 8]", "data.batch_size=16", "fake_quant_kernels=eager"]
    args = ["--steps", "11", "--rounds", "1", "--processes", "2", "--optimizers", "adamw"]
    out = _bench(monkeypatch, capsys, "bench_ddp.py", *args, *[a for s in tiny for a in ("--set", s)])
    (row,) = _table_rows(out, "adamw")
    assert row[1] == "2 x 1" and float(row[2]) > 0 and row[3] == "-"


def test_export_acceptance_validates_each_case(monkeypatch, capsys, cifar):
    monkeypatch.setenv("QAT_SADAM_DATA", str(cifar))
    args = ["--case", "small_cnn:4", "--images", "8", "--steps", "1", "--target", "cpu-x86"]
    out = _bench(monkeypatch, capsys, "export_acceptance.py", *args)
    header, (row,) = _table_rows(out, "model"), _table_rows(out, "small_cnn")
    assert len(row) == len(header[0]) == 13
    assert row[1] == "W4A4" and row[2] == "3/3" and row[3] == "0 / 0" and row[-1] == "PASS"


def test_export_site_parity_reports_every_site(monkeypatch, capsys, tiny_run):
    args = ["--run", str(tiny_run), "--images", "8", "--target", "cpu-x86"]
    out = _bench(monkeypatch, capsys, "export_site_parity.py", *args)
    sites = [r for r in _table_rows(out, "") if r[0].isdigit()]
    assert len(sites) >= 5 and all(r[4] == "0.00e+00" for r in sites)  # isolated: each op exact
    assert "integer reference 100.0% (max |diff| 0)" in out


def test_runtimes_table_exports_a_run_for_a_target(monkeypatch, capsys, tiny_run, tmp_path):
    monkeypatch.chdir(tmp_path)
    args = [str(tiny_run), "--target", "cpu-x86", "--runtimes", "ort-cpu", "--samples", "8", "--out", "table"]
    _bench(monkeypatch, capsys, "runtimes_table.py", *args)
    rows = json.loads((tmp_path / "table" / "rows.json").read_text())
    assert rows["tiny"]["passed"] and rows["tiny"]["runtimes"]["ort-cpu"]["parity"]["max_lsb"] == 0
    assert (tmp_path / "runs" / "runtimes" / "tiny" / "validation.md").exists()
    table = (tmp_path / "table" / "table.md").read_text()
    assert "| ort-cpu | within tolerance (tolerance 0 LSB, 100% top-1) | 0.0 LSB |" in table


def test_dense_models_validate_every_output(monkeypatch, capsys, tmp_path):
    args = ["--models", "kws", "unet", "--bits", "8", "--images", "2", "--out", str(tmp_path)]
    _bench(monkeypatch, capsys, "dense_models.py", *args)
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["model"], r["bit_exact"]) for r in rows] == [("kws", True), ("unet", True)]
    assert len(_table_rows((tmp_path / "README.md").read_text(), "")) == 3  # the header and two models


def test_model_zoo_row_and_table(monkeypatch, capsys, tmp_path):
    """The per-model step (the sweep runs it in a child process, one per model) and the table."""
    args = ["--one", "squeezenet1_1", "--source", "torchvision", "--bits", "8", "--images", "2"]
    row = json.loads(_bench(monkeypatch, capsys, "model_zoo.py", *args).strip().splitlines()[-1])
    assert row["model"] == "squeezenet1_1" and row["bit_exact"] and row["integer_kernels"] == 26
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    _bench(monkeypatch, capsys, "model_zoo.py", "--out", str(tmp_path), "--report-only")
    assert "- torchvision W8A8: 1 of 1 fully integer and bit-exact" in (tmp_path / "README.md").read_text()


def test_bench_toolkits_runs_our_cell_as_a_user_does(monkeypatch, capsys, tmp_path):
    """Ours only: each peer toolkit patches torch on import and runs in a process of its own (seconds
    of imports each, and a minute of its own work on the smallest model); docs/studies/peers.md."""
    monkeypatch.chdir(tmp_path)
    tiny = ["max_steps=4", "fake_quant_kernels=eager", "calibration_batches=1", "model.width=8"]
    sets = [a for s in tiny for a in ("--set", s)]
    assert main(["train", "quickstart_float", "--out", "runs/quickstart_float", "--quiet", *sets]) == 0
    args = ["--recipe", "quickstart_finetune", "--bits", "W4A8", "--toolkits", "qat-sadam", "--no-runtimes"]
    out = _bench(monkeypatch, capsys, "bench_toolkits.py", *args, "--out", "peers", *sets)
    (row,) = json.loads((tmp_path / "peers" / "toolkits.json").read_text())["rows"]
    assert row["toolkit"] == "qat-sadam" and row["bits"] == "W4A8" and 0 <= row["qat_acc"] <= 1
    assert _table_rows(out, "W4A8")[0][:3] == ["W4A8", "qat-sadam", "1"]
