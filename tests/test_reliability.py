"""Faults a long run meets: kill -9, full disks, NaN, untrusted files, bad input (docs/reliability.md)."""

import errno
import itertools
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from qat_sadam.cli import main
from qat_sadam.errors import CheckpointError, TrainingStopped
from qat_sadam.train import checkpoint as ckpt_mod
from qat_sadam.train.checkpoint import load_checkpoint, save_atomic
from qat_sadam.train.recipe import load_recipe
from qat_sadam.train.trainer import Trainer

TINY = [
    "data.name=synthetic",
    "data.image_size=8",
    "data.batch_size=64",
    "model.name=small_cnn",
    "model.width=8",
    "epochs=3",
    "calibration_batches=1",
    "data.eval_batch_size=256",
    "checkpoint.every_steps=4",
    "optimizer.probe_every=3",
    "quant.bits=4",
    # The eager fake-quant ops (the same numbers as the fused kernels, test_train.py): each process here
    # would otherwise build the fused kernels first, seconds of compiling per process.
    "fake_quant_kernels=eager",
]

# Waits end on events (a step logged, a file written, a process ending); this deadline only stops a
# hung process from hanging the suite, so it is generous: a loaded 2-core machine (load 8-13) runs
# three trainers' start-up and kernel builds side by side in minutes, not seconds.
HUNG = 900


def _cli(out, *extra):
    args = [sys.executable, "-m", "qat_sadam", "train", "quickstart", "--out", str(out), "--quiet"]
    for s in TINY + ["export.enabled=false"]:
        args += ["--set", s]
    return args + list(extra)


def _weights(path):
    return load_checkpoint(str(path))["model"]


def _steps_logged(run):
    f = run / "metrics.jsonl"
    return sum(1 for line in open(f) if '"type": "step"' in line) if f.exists() else 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The weights of the TINY run left alone, trained in this process (the interrupted runs are
    subprocesses: a process start and its kernel builds cost about 10 s here)."""
    ref = tmp_path_factory.mktemp("uninterrupted")
    assert main(_cli(ref)[3:]) == 0
    return _weights(ref / "checkpoints" / "last.pt")


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, uninterrupted):
    # before the first checkpoint, mid-epoch, late in the last epoch; the three runs side by side
    runs = {kill_at: tmp_path / f"kill{kill_at}" for kill_at in (3, 11, 29)}
    pending = {
        k: subprocess.Popen(_cli(run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for k, run in runs.items()
    }
    deadline = time.time() + HUNG  # waits on events: a step logged, or a run that ended too soon
    while pending and time.time() < deadline:
        for kill_at, p in list(pending.items()):
            if _steps_logged(runs[kill_at]) >= kill_at:
                p.send_signal(signal.SIGKILL)
                p.wait()
                del pending[kill_at]
            else:
                assert p.poll() is None, f"the run ended before step {kill_at}"
        time.sleep(0.01)
    assert not pending, f"a run logged no step for {HUNG} s: hung"
    for kill_at, run in runs.items():
        last = run / "checkpoints" / "last.pt"
        if last.exists():  # any checkpoint present is whole and loadable
            load_checkpoint(str(last))
        assert main(_cli(run, "--resume" if last.exists() else "--force")[3:]) == 0
        got = _weights(last)
        assert all(torch.equal(got[k], uninterrupted[k]) for k in uninterrupted), f"kill at step {kill_at}"
        steps = [json.loads(line)["step"] for line in open(run / "metrics.jsonl") if '"type": "step"' in line]
        assert steps == list(range(1, len(steps) + 1))  # no step logged twice after the resume


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES])
def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, err):
    path = tmp_path / "last.pt"
    save_atomic({"model": {"w": torch.ones(3)}, "recipe": {}}, str(path))

    def broken(obj, f):
        f.write(b"partial")
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(ckpt_mod.torch, "save", broken)
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint {path}: {os.strerror(err)}"):
        save_atomic({"model": {"w": torch.zeros(3)}, "recipe": {}}, str(path))
    assert torch.equal(load_checkpoint(str(path))["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


def test_unwritable_output_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint {blocker}/sub/last.pt"):
        save_atomic({"model": {}, "recipe": {}}, str(blocker / "sub" / "last.pt"))


def _poison_loss_at(monkeypatch, step):
    import qat_sadam.train.trainer as tr

    real, calls = tr.F.cross_entropy, itertools.count(1)

    def poisoned(*a, **k):
        out = real(*a, **k)
        return out * float("nan") if torch.is_grad_enabled() and next(calls) == step else out

    monkeypatch.setattr(tr.F, "cross_entropy", poisoned)


def test_nan_loss_stops_with_step_and_last_good_checkpoint(tmp_path, monkeypatch):
    r = load_recipe(None, TINY + ["checkpoint.every_steps=2"], optimizer="sadam")
    t = Trainer(r, str(tmp_path), progress=False)
    _poison_loss_at(monkeypatch, 7)
    with pytest.raises(
        TrainingStopped, match=r"non-finite loss at step 6 \(epoch 0\); last good checkpoint: .*last.pt"
    ):
        t.train()
    ck = load_checkpoint(str(tmp_path / "checkpoints" / "last.pt"))
    assert ck["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_non_finite_gradient_with_a_finite_loss_stops_too(tmp_path):
    r = load_recipe(None, TINY + ["checkpoint.every_steps=2"], optimizer="sadam")
    t = Trainer(r, str(tmp_path), progress=False)
    calls = iter(range(10**6))
    p = next(t.model.parameters())
    # the 5th backward pass through this parameter (S-Adam probes do not backpropagate) gets an inf
    p.register_hook(lambda g: g * float("inf") if next(calls) == 4 else g)
    with pytest.raises(TrainingStopped, match=r"non-finite gradient at step 4 \(epoch 0\)"):
        t.train()
    assert load_checkpoint(str(tmp_path / "checkpoints" / "last.pt"))["global_step"] == 4


def test_nan_loss_skip_policy_skips_the_step(tmp_path, monkeypatch):
    tiny = [t for t in TINY if not t.startswith("optimizer.probe_every")]  # an S-Adam key: adamw refuses it
    r = load_recipe(None, tiny + ["nan_policy=skip", "epochs=1"], optimizer="adamw")
    t = Trainer(r, str(tmp_path), progress=False)
    _poison_loss_at(monkeypatch, 3)
    s = t.train()
    assert s["skipped_steps"] == 1 and s["steps"] == 16
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_malicious_pickle_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": Evil(), "recipe": {}}, f)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(str(path))
    assert not marker.exists()
    assert main(["eval", str(path)]) == 2 and not marker.exists()


def _bad_cases():
    cases = [["--bits", b] for b in ("0", "1", "9", "16", "-4", "four", "4.5", "")]
    cases += [["--optimizer", o] for o in ("lion", "Adam", "", "sadam ")]
    cases += [["--seed", s] for s in ("x", "1.5")]
    bad_values = {
        "epochs": ["0", "-1", "ten", "1.5", "true", "[1]"],
        "seed": ["abc", "{}"],
        "data.batch_size": ["0", "-8", "big", "null"],
        "data.name": ["mnist", "7"],
        "data.val_split": ["1.0", "-0.1", "half"],
        "data.eval_on": ["train"],
        "schedule.name": ["step", "3"],
        "nan_policy": ["ignore"],
        "device": ["tpu"],
        "quant.bits": ["1", "12", "x"],
        "quant.placement": ["all"],
        "quant.weight.init": ["magic"],
        "quant.weight.scale_mode": ["auto"],
        "quant.activation.percentile": ["0", "101"],
        "quant.first_last_bits": ["1"],
        "optimizer.lr": ["-1", "fast"],
        "optimizer.k": ["0"],
        "optimizer.lam": ["-2"],
        "optimizer.lgi": ["magic"],
        "optimizer.betas": ["[0.9]", "1"],
        "optimizer.probe_every": ["0"],
        "model.name": ["vgg"],
        "model.cifar_stem": ["maybe"],
        "logging.every": ["0"],
        "data.augment.crop_padding": ["x"],
        "checkpoint.every_steps": ["-1"],
    }
    cases += [["--set", f"{k}={v}"] for k, vs in bad_values.items() for v in vs]
    cases += [
        ["--set", s]
        for s in (
            "nokey",
            "=3",
            "a..b=1",
            "epochz=3",
            "data.batchsize=3",
            "optimizer.momentum=0.9",
            "quant.overrides=[{pattern: 'nope*', bits: 8}]",
            "quant.weight={symmetric: false}",
        )
    ]
    return cases


@pytest.mark.parametrize("extra", _bad_cases(), ids=lambda c: " ".join(c)[:40])
def test_fuzzed_cli_and_recipe_errors_exit_2_without_traceback(extra, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "quickstart", "--out", str(out)] + extra)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_fuzz_table_has_at_least_50_cases():
    assert len(_bad_cases()) >= 50


def _wait_for_steps(run, n, p):
    deadline = time.time() + HUNG
    while _steps_logged(run) < n and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert p.poll() is None, "the run ended before the signal could be sent"


def test_sigterm_and_ctrl_c_save_mid_run_and_resume_equals_an_uninterrupted_run(tmp_path, uninterrupted):
    """SIGTERM, what SLURM and Kubernetes send before they preempt, and Ctrl-C: a clean save at the
    next step, exit 143 and 130. The SIGTERM run resumes in a fresh process, as after a preemption,
    the Ctrl-C run in this one. The two runs go side by side: a process start costs seconds here."""
    term, ctrl_c = tmp_path / "term", tmp_path / "ctrl_c"
    pt, pc = (
        subprocess.Popen(_cli(r), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (term, ctrl_c)
    )
    _wait_for_steps(term, 6, pt)
    pt.send_signal(signal.SIGTERM)
    _wait_for_steps(ctrl_c, 6, pc)
    pc.send_signal(signal.SIGINT)
    (out_t, _), (out_c, _) = pt.communicate(timeout=HUNG), pc.communicate(timeout=HUNG)
    assert pt.returncode == 143 and "interrupted by SIGTERM" in out_t
    assert pc.returncode == 130 and "continue with --resume" in out_c
    step = load_checkpoint(str(term / "checkpoints" / "last.pt"))["global_step"]
    assert 6 <= step < 48 and step % 16 != 0  # the signal landed mid-epoch, mid-run (3 epochs of 16 steps)
    assert load_checkpoint(str(ctrl_c / "checkpoints" / "last.pt"))["global_step"] >= 6
    fresh = subprocess.Popen(_cli(term, "--resume"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert main(_cli(ctrl_c, "--resume")[3:]) == 0
    assert fresh.wait(timeout=HUNG) == 0, fresh.stderr.read()[-2000:]
    for run in (term, ctrl_c):
        got = _weights(run / "checkpoints" / "last.pt")
        assert all(torch.equal(got[k], uninterrupted[k]) for k in uninterrupted), run.name


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path, capsys):
    run = tmp_path / "run"
    p = subprocess.Popen(_cli(run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_steps(run, 2, p)
    for argv in (_cli(run, "--force")[3:], ["export", str(run)], ["train", "x", "--resume", "--out", str(run)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"run directory {run} is in use by process {p.pid}" in err and err.count("\n") == 1
    p.send_signal(signal.SIGKILL)  # the kernel releases the lock of a killed process: no stale lock
    p.wait()
    assert (run / "checkpoints").exists()  # --force deleted nothing while the lock was held
    assert main(_cli(run, "--force")[3:]) == 0
    steps = [json.loads(line)["step"] for line in open(run / "metrics.jsonl") if '"type": "step"' in line]
    assert steps == list(range(1, 49))  # one writer's records, each step once


def test_resume_applies_safe_overrides_and_records_them(tmp_path):
    run = tmp_path / "run"
    assert main(_cli(run, "--set", "epochs=1")[3:]) == 0
    assert (
        main(
            [
                "train",
                "x",
                "--resume",
                "--out",
                str(run),
                "--set",
                "epochs=2",
                "--set",
                "checkpoint.every_steps=5",
                "--quiet",
            ]
        )
        == 0
    )
    summary = json.load(open(run / "summary.json"))
    assert summary["epochs"] == 2 and summary["steps"] == 32
    assert "epochs: 2" in (run / "recipe.yaml").read_text()
    history = [json.loads(line) for line in open(run / "recipe_history.jsonl")]
    assert history == [{"step": 16, "changes": {"checkpoint.every_steps": [4, 5], "epochs": [1, 2]}}]


def test_an_unreadable_last_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    # A constant lr (max_steps below must not reshape the schedule) and a model with dropout: its masks
    # come from the global RNG, so the resumed run equals the reference only if the RNG state is restored.
    extra = [
        "--set",
        "schedule.name=constant",
        "--set",
        "model.name=paper_cnn",
        "--set",
        "model.widths=[8,8]",
        "--set",
        "data.image_size=16",
    ]
    ref = tmp_path / "ref"
    assert main(_cli(ref, *extra)[3:]) == 0
    run = tmp_path / "run"
    assert main(_cli(run, "--set", "max_steps=22", *extra)[3:]) == 0  # saves at 4, 8, ... 20, 22
    last = run / "checkpoints" / "last.pt"
    assert load_checkpoint(str(run / "checkpoints" / "last.prev.pt"))["global_step"] == 20
    last.write_bytes(last.read_bytes()[:1000])  # a copy cut short
    capsys.readouterr()
    assert main(["train", "x", "--resume", "--out", str(run), "--set", "max_steps=null", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"note: {last} is unusable" in err and "resuming from" in err and "(step 20)" in err
    final, got = _weights(ref / "checkpoints" / "last.pt"), _weights(last)
    assert all(torch.equal(got[k], final[k]) for k in final)
