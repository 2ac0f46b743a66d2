"""Fuzz table for data files and run directories (docs/reliability.md): each bad file or damaged
run directory gives exit 2 and one line naming the file (and the array and index where there is
one), no traceback, and nothing already there is lost."""

import io
import json
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from qat_sadam.cli import main

N_TRAIN, N_TEST = 40, 20


def _cifar(tmp, **bad):
    """A valid tiny CIFAR-100 npz set in tmp, with the named arrays replaced."""
    rng = np.random.default_rng(0)
    arrays = {
        "train": {
            "x": rng.integers(0, 255, (N_TRAIN, 32, 32, 3), dtype=np.uint8),
            "y": (np.arange(N_TRAIN) % 10).astype(np.uint8),
        },
        "test": {
            "x": rng.integers(0, 255, (N_TEST, 32, 32, 3), dtype=np.uint8),
            "y": (np.arange(N_TEST) % 10).astype(np.uint8),
        },
    }
    for key, value in bad.items():
        split, name = key.split("_", 1)
        if value is None:
            del arrays[split][name]
        else:
            arrays[split][name] = value
    np.savez(tmp / "cifar100_train_part1.npz", **arrays["train"])
    np.savez(tmp / "cifar100_test.npz", **arrays["test"])


def _huge_header(path):
    """An npz whose x claims a billion 32x32x3 images (a corrupt header): refused before any read."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (10**9, 32, 32, 3)})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", buf.getvalue() + b"\0" * 64)
        y = io.BytesIO()
        np.save(y, np.zeros(10**9 // 10**9, np.uint8))
        z.writestr("y.npy", y.getvalue())


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


CIFAR_CASES = {
    "truncated train file": (
        lambda t: (_cifar(t), _truncated(t / "cifar100_train_part1.npz")),
        "cifar100_train_part1.npz: not a readable npz file",
    ),
    "text named .npz": (
        lambda t: (_cifar(t), (t / "cifar100_test.npz").write_text("hello")),
        "cifar100_test.npz: not a readable npz file",
    ),
    "no x": (lambda t: _cifar(t, train_x=None), "no array 'x'"),
    "no y": (lambda t: _cifar(t, test_y=None), "no array 'y'"),
    "float pixels": (
        lambda t: _cifar(t, train_x=np.zeros((N_TRAIN, 32, 32, 3), np.float32)),
        "has dtype float32; expected uint8",
    ),
    "int16 pixels": (
        lambda t: _cifar(t, train_x=np.zeros((N_TRAIN, 32, 32, 3), np.int16)),
        "has dtype int16; expected uint8",
    ),
    "grey images": (
        lambda t: _cifar(t, train_x=np.zeros((N_TRAIN, 32, 32), np.uint8)),
        "has shape (40, 32, 32); expected (N, 32, 32, 3)",
    ),
    "CHW layout": (lambda t: _cifar(t, train_x=np.zeros((N_TRAIN, 3, 32, 32), np.uint8)), "expected (N, 32, 32, 3)"),
    "no images": (
        lambda t: _cifar(t, test_x=np.zeros((0, 32, 32, 3), np.uint8), test_y=np.zeros(0, np.uint8)),
        "has shape (0, 32, 32, 3)",
    ),
    "label 250": (
        lambda t: _cifar(t, train_y=np.where(np.arange(N_TRAIN) == 7, 250, np.arange(N_TRAIN) % 10).astype(np.uint8)),
        "array 'y' index 7 holds label 250, outside [0, 100)",
    ),
    "label -1": (
        lambda t: _cifar(t, test_y=np.where(np.arange(N_TEST) == 3, -1, np.arange(N_TEST) % 10).astype(np.int8)),
        "array 'y' index 3 holds label -1, outside [0, 100)",
    ),
    "float labels": (
        lambda t: _cifar(t, train_y=(np.arange(N_TRAIN) % 10).astype(np.float32)),
        "has dtype float32; expected integer",
    ),
    "labels 2-D": (lambda t: _cifar(t, train_y=np.zeros((N_TRAIN, 1), np.uint8)), "has shape (40, 1); expected (40,)"),
    "fewer labels": (lambda t: _cifar(t, test_y=np.zeros(N_TEST - 1, np.uint8)), "has shape (19,); expected (20,)"),
    "test class unseen": (
        lambda t: _cifar(t, test_y=np.full(N_TEST, 42, np.uint8)),
        "label 42 (first at index 0) never occurs",
    ),
    "object array": (
        lambda t: _cifar(t, train_y=np.array([{"a": 1}] * N_TRAIN, dtype=object)),
        "not a readable npz file",
    ),
    "huge header": (
        lambda t: (_cifar(t), _huge_header(t / "cifar100_train_part1.npz")),
        "claims shape (1000000000, 32, 32, 3)",
    ),
    "no test file": (lambda t: (_cifar(t), (t / "cifar100_test.npz").unlink()), "cifar100: not found under"),
}


def _jpeg(rng, size=64) -> np.ndarray:
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(b, format="JPEG")
    return np.frombuffer(b.getvalue(), dtype=np.uint8)


def _tiny(tmp, corrupt=None, offsets=None, labels=None, drop=None):
    rng = np.random.default_rng(0)
    jpegs = [_jpeg(rng) for _ in range(4)]
    if corrupt is not None:
        jpegs[corrupt] = np.frombuffer(b"not a jpeg at all", dtype=np.uint8)
    buf = np.concatenate(jpegs)
    off = np.cumsum([0] + [len(j) for j in jpegs]).astype(np.int64)
    arrays = dict(
        train_jpeg=buf,
        train_offsets=off if offsets is None else offsets,
        y_train=np.array([0, 1, 0, 1], np.int16),
        val_jpeg=buf,
        val_offsets=off,
        y_val=np.array([0, 1, 0, 1] if labels is None else labels, np.int16),
    )
    arrays.pop(drop, None)
    np.savez(tmp / "tinyimagenet_subset.npz", **arrays)


TINY_CASES = {
    "corrupt jpeg": (lambda t: _tiny(t, corrupt=2), "image 2 of 'train_jpeg' cannot be decoded"),
    "offsets decreasing": (
        lambda t: _tiny(t, offsets=np.array([0, 900, 800, 1600, 2400], np.int64)),
        "offsets of 'train_jpeg' are not increasing",
    ),
    "offsets past the end": (
        lambda t: _tiny(t, offsets=np.array([0, 10, 20, 30, 10**9], np.int64)),
        "offsets of 'train_jpeg' are not increasing",
    ),
    "label 200": (lambda t: _tiny(t, labels=[0, 1, 200, 1]), "array 'y_val' index 2 holds label 200, outside [0, 200)"),
    "no labels": (lambda t: _tiny(t, drop="y_train"), "no array 'y_train'"),
}


def _folder(tmp, empty_class=False, bad_image=False, sizes=False):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = tmp / split / c
            d.mkdir(parents=True)
            if empty_class and split == "train" and c == "b":
                continue
            for i in range(2):
                size = 64 if not (sizes and c == "b" and i == 1) else 32
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
    if bad_image:
        (tmp / "val" / "a" / "1.jpg").write_bytes(b"\xff\xd8 broken")


FOLDER_CASES = {
    "empty class folder": (lambda t: _folder(t, empty_class=True), "not a usable ImageFolder"),
    "unreadable image": (lambda t: _folder(t, bad_image=True), "1.jpg: cannot read the image"),
    "mixed sizes": (lambda t: _folder(t, sizes=True), "the images do not all have one size"),
}


def _data_cmd(tmp, name):
    return [
        "train",
        "quickstart",
        "--out",
        str(tmp / "run"),
        "--set",
        f"data.name={name}",
        "--set",
        f"data.root={tmp / 'data'}",
        "--set",
        "export.enabled=false",
    ]


@pytest.mark.parametrize(
    "case",
    [("cifar100", k, *v) for k, v in CIFAR_CASES.items()]
    + [("tinyimagenet", k, *v) for k, v in TINY_CASES.items()]
    + [("tinyimagenet", k, *v) for k, v in FOLDER_CASES.items()],
    ids=lambda c: f"{c[0]}: {c[1]}",
)
def test_bad_data_files_exit_2_with_one_line(case, tmp_path, capsys, monkeypatch):
    name, _, make, message = case
    (tmp_path / "data").mkdir()
    monkeypatch.setenv("QAT_SADAM_CACHE", str(tmp_path / "cache"))
    make(tmp_path / "data")
    files = sorted(p.name for p in (tmp_path / "data").rglob("*"))
    code = main(_data_cmd(tmp_path, name))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err, err
    assert not (tmp_path / "run").exists() and sorted(p.name for p in (tmp_path / "data").rglob("*")) == files


# -- run directories ----------------------------------------------------------------------------------
TINY_RUN = [
    "data.name=synthetic",
    "data.image_size=8",
    "data.batch_size=64",
    "model.name=small_cnn",
    "model.width=8",
    "epochs=1",
    "calibration_batches=1",
    "data.eval_batch_size=256",
    "quant.bits=4",
    "export.enabled=false",
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    argv = ["train", "quickstart", "--out", str(run), "--quiet", "--optimizer", "adamw"]
    for s in TINY_RUN:
        argv += ["--set", s]
    assert main(argv) == 0
    return run


def _copy(run, tmp):
    import shutil

    dst = tmp / "copy"
    shutil.copytree(run, dst)
    return dst


def _other_model_checkpoint(run):
    from qat_sadam.train.checkpoint import load_checkpoint, save_atomic

    for name in ("best.pt", "last.pt"):
        ck = load_checkpoint(str(run / "checkpoints" / name))
        ck["model"] = {"conv.weight": torch.zeros(3, 3)}
        save_atomic(ck, str(run / "checkpoints" / name))


RUN_CASES = {
    "eval: checkpoint of another model": (
        _other_model_checkpoint,
        ["eval", "{run}"],
        "does not match the model's keys",
    ),
    "eval: best.pt truncated": (
        lambda r: _truncated(r / "checkpoints" / "best.pt"),
        ["eval", "{run}"],
        "refusing to load",
    ),
    "eval: no checkpoints": (
        lambda r: [p.unlink() for p in (r / "checkpoints").iterdir()],
        ["eval", "{run}"],
        "no checkpoint in",
    ),
    "export: recipe.yaml not YAML": (
        lambda r: (r / "recipe.yaml").write_text("{[:"),
        ["export", "{run}"],
        "recipe.yaml: not a readable recipe",
    ),
    "export: recipe.yaml a list": (
        lambda r: (r / "recipe.yaml").write_text("- 1\n- 2\n"),
        ["export", "{run}"],
        "not a recipe",
    ),
    "export: checkpoint of another model": (
        _other_model_checkpoint,
        ["export", "{run}"],
        "does not match the model's keys",
    ),
    "resume: last.pt truncated, none before": (
        lambda r: (
            _truncated(r / "checkpoints" / "last.pt"),
            (r / "checkpoints" / "last.prev.pt").unlink(missing_ok=True),
        ),
        ["train", "x", "--resume", "--out", "{run}"],
        "no previous checkpoint",
    ),
    "resume: change the bits": (
        lambda r: None,
        ["train", "x", "--resume", "--out", "{run}", "--bits", "8"],
        "--resume cannot change quant.bits (4 -> 8)",
    ),
    "resume: change the optimizer": (
        lambda r: None,
        ["train", "x", "--resume", "--out", "{run}", "--set", "optimizer.lr=0.5"],
        "--resume cannot change optimizer.lr",
    ),
    "resume: change the data": (
        lambda r: None,
        ["train", "x", "--resume", "--out", "{run}", "--set", "data.batch_size=8"],
        "--resume cannot change data.batch_size (64 -> 8)",
    ),
    "compare: summary.json not JSON": (
        lambda r: (r / "summary.json").write_text("{not json"),
        None,
        "not a readable summary",
    ),
}


@pytest.mark.parametrize("case", sorted(RUN_CASES), ids=str)
def test_damaged_run_directories_exit_2_with_one_line(case, finished_run, tmp_path, capsys):
    damage, argv, message = RUN_CASES[case]
    run = _copy(finished_run, tmp_path)
    damage(run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    if argv is None:  # a compare study whose cell's summary is damaged
        cell = tmp_path / "cmp" / "adamw" / "seed0"
        cell.parent.mkdir(parents=True)
        os.rename(run, cell)
        run = cell
        before = {cell / p.relative_to(tmp_path / "copy"): v for p, v in before.items()}
        argv = [
            "compare",
            "quickstart",
            "--optimizers",
            "adamw",
            "--seeds",
            "1",
            "--out",
            str(tmp_path / "cmp"),
            "--report-only",
        ]
    code = main([a.replace("{run}", str(run)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err and message in err, err
    assert {p: p.read_bytes() for p in before if p.exists()} == before  # nothing lost or rewritten


def test_a_torn_metrics_line_is_skipped_on_resume(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"type": "step", "step": 99, "lo')  # a line cut by a crash
    assert main(["train", "x", "--resume", "--out", str(run), "--set", "epochs=2", "--quiet"]) == 0
    steps = [json.loads(line)["step"] for line in open(run / "metrics.jsonl") if '"type": "step"' in line]
    assert steps == list(range(1, len(steps) + 1))


def test_a_run_begun_before_a_recipe_key_existed_resumes_with_its_default(finished_run, tmp_path, capsys):
    """A checkpoint whose recipe predates host_memory (added in stop 35) resumes; the note names the key."""
    run = _copy(finished_run, tmp_path)
    last = run / "checkpoints" / "last.pt"
    ck = torch.load(last, weights_only=True)
    del ck["recipe"]["host_memory"]
    torch.save(ck, last)
    assert main(["train", "x", "--resume", "--out", str(run), "--set", "epochs=2", "--quiet"]) == 0
    assert "predates host_memory; resuming with the default(s) 'auto'" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in open(run / "metrics.jsonl") if '"type": "step"' in line]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] > ck["global_step"]


def test_fuzz_table_has_at_least_30_file_cases():
    assert len(CIFAR_CASES) + len(TINY_CASES) + len(FOLDER_CASES) + len(RUN_CASES) + 1 >= 30
