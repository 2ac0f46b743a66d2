"""Data-parallel training under torchrun (gloo, 2 CPU processes) against one process."""

import json
import os
import subprocess
import sys

import pytest
import torch

from qat_sadam.cli import main
from qat_sadam.train.checkpoint import load_checkpoint

TINY = [
    "model.name=paper_cnn",
    "model.dropout=0.0",
    "model.widths=[8, 8]",
    "data.name=synthetic",
    "data.image_size=16",
    "data.batch_size=64",
    "epochs=1",
    "calibration_batches=1",
    "export.enabled=false",
    "quant.bits=8",
    # The eager fake-quant ops (the same numbers as the fused kernels, test_train.py): each rank would
    # otherwise build the fused kernels first, seconds of compiling per process.
    "fake_quant_kernels=eager",
]
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def _train(out, nproc, optimizer, extra=()):
    """Two ranks under torchrun, each on one thread; one process is this one, on one thread too
    (a process start and its kernel builds cost about 10 s here)."""
    sets = [a for s in TINY + list(extra) for a in ("--set", s)]
    args = ["train", "quickstart", "--optimizer", optimizer, "--out", str(out), "--quiet"] + sets
    if nproc == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert main(args) == 0
        finally:
            torch.set_num_threads(threads)
    else:
        r = subprocess.run(
            [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", "qat_sadam"] + args,
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-3000:]
    return load_checkpoint(str(out / "checkpoints" / "last.pt"))["model"], json.load(open(out / "summary.json"))


# Two runs whose float sums differ in order drift apart once a weight or activation sits on a rounding
# edge of its quantizer and flips; Adam moves every weight by about lr per step, so that happens
# within a few steps (SGD's small moves keep about a dozen steps together: with LSQPerTensor's sums
# the first flip comes between steps 13 and 16, before it 12 steps agree within 1e-6). Hence: 12
# SGD steps, and one S-Adam step (probing at it, so the probe losses' all-reduce is part of it; its Adam
# moments are AdamW's, whose own case added nothing to what these two check).
@pytest.mark.parametrize(
    "optimizer,extra", [("sgd", ["max_steps=12"]), ("sadam", ["max_steps=1", "optimizer.probe_every=1"])]
)
def test_two_ranks_with_half_batches_match_one_process(tmp_path, optimizer, extra):
    one, _ = _train(tmp_path / "one", 1, optimizer, extra)
    two, summary = _train(tmp_path / "two", 2, optimizer, extra)
    assert summary["world_size"] == 2
    for k, v in one.items():
        if v.is_floating_point():
            torch.testing.assert_close(two[k], v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("optimizer", ["sadam", "sadam-reference"])
def test_ranks_stay_identical_through_sadam_training(tmp_path, optimizer):
    extra = ["optimizer.probe_every=1"] if optimizer == "sadam" else ["optimizer.lgi=reference", "optimizer.k=2"]
    _, summary = _train(tmp_path / "two", 2, "sadam", extra + ["quant.activation.scale_mode=observer"])
    # parameters, LSQ scales, observer scales and buffers: bit-identical on both ranks after 16 steps
    assert summary["rank_max_state_diff"] == 0.0


def test_sigterm_stops_every_rank_at_one_step_and_resume_matches(tmp_path):
    """torchrun forwards SIGTERM to its workers; they agree on the step to stop at (one all-reduce of
    the stop flag per step), save once, and a resumed data-parallel run ends where an uninterrupted
    one ends."""
    import signal
    import time

    extra = ["epochs=3", "checkpoint.every_steps=4"]
    ref, _ = _train(tmp_path / "ref", 2, "sgd", extra)
    sets = [a for s in TINY + extra for a in ("--set", s)]
    cmd = [
        TORCHRUN,
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "qat_sadam",
        "train",
        "quickstart",
        "--optimizer",
        "sgd",
        "--out",
        str(tmp_path / "run"),
        "--quiet",
    ] + sets
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 900  # ends on the fifth step logged; only a hung run waits this long
    while not (metrics.exists() and metrics.read_text().count('"type": "step"') >= 5) and time.time() < deadline:
        assert p.poll() is None, "torchrun ended before its fifth step"
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=900)
    assert out.count("interrupted by SIGTERM") == 1  # rank 0 reports for both
    step = load_checkpoint(str(tmp_path / "run" / "checkpoints" / "last.pt"))["global_step"]
    assert 5 <= step < 48
    resumed = subprocess.run(
        [
            TORCHRUN,
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "qat_sadam",
            "train",
            "x",
            "--resume",
            "--out",
            str(tmp_path / "run"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = load_checkpoint(str(tmp_path / "run" / "checkpoints" / "last.pt"))["model"]
    assert all(torch.equal(got[k], ref[k]) for k in ref)
