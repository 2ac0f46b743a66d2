import io

import numpy as np
import pytest
import torch
from PIL import Image

from qat_sadam.errors import DataError, RecipeError
from qat_sadam.train.data import Loader, load_data
from qat_sadam.train.recipe import DataSection


def _jpegs(n, size, seed):
    rng = np.random.default_rng(seed)
    bufs = []
    for _ in range(n):
        b = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(b, format="JPEG")
        bufs.append(np.frombuffer(b.getvalue(), dtype=np.uint8))
    return np.concatenate(bufs), np.cumsum([0] + [len(b) for b in bufs]).astype(np.int64)


def test_tinyimagenet_npz_is_decoded_once_and_cached(tmp_path, monkeypatch):
    tr, tro = _jpegs(6, 64, 0)
    va, vao = _jpegs(4, 64, 1)
    np.savez(
        tmp_path / "tinyimagenet_subset.npz",
        train_jpeg=tr,
        train_offsets=tro,
        y_train=np.arange(6, dtype=np.int16) % 3,
        val_jpeg=va,
        val_offsets=vao,
        y_val=np.arange(4, dtype=np.int16) % 3,
    )
    monkeypatch.setenv("QAT_SADAM_CACHE", str(tmp_path / "cache"))
    d = load_data(DataSection(name="tinyimagenet", root=str(tmp_path)))
    assert d.train.x.shape == (6, 3, 64, 64) and d.test.x.shape == (4, 3, 64, 64) and d.train.x.dtype == torch.uint8
    assert (tmp_path / "cache" / "tinyimagenet_subset_decoded.npz").exists()
    again = load_data(DataSection(name="tinyimagenet", root=str(tmp_path)))
    assert torch.equal(again.train.x, d.train.x)


def test_cifar_npz_parts_and_validation_split(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in (("cifar100_train_part1", 60), ("cifar100_train_part2", 40), ("cifar100_test", 20)):
        np.savez(
            tmp_path / f"{name}.npz",
            x=rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8),
            y=rng.permutation(np.arange(n) % 100).astype(np.uint8),
        )
    d = load_data(DataSection(name="cifar100", root=str(tmp_path), val_split=0.2, eval_on="val"))
    assert len(d.train.y) == 80 and len(d.test.y) == 20 and d.num_classes == 100
    d2 = load_data(DataSection(name="cifar100", root=str(tmp_path)))
    assert len(d2.train.y) == 100 and len(d2.test.y) == 20
    y_all = np.concatenate([np.load(tmp_path / f"cifar100_train_part{i}.npz")["y"] for i in (1, 2)])
    d3 = load_data(DataSection(name="cifar100", root=str(tmp_path), classes=10))
    assert d3.num_classes == 10 and len(d3.train.y) == int((y_all < 10).sum()) > 0
    assert int(d3.train.y.max()) < 10 and int(d3.test.y.max()) < 10
    with pytest.raises(RecipeError, match="cifar100 has 100 classes"):
        load_data(DataSection(name="cifar100", root=str(tmp_path), classes=101))


def test_missing_data_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError, match="tinyimagenet: no data under"):
        load_data(DataSection(name="tinyimagenet", root=str(tmp_path)))
    with pytest.raises(DataError, match="set data.root"):
        load_data(DataSection(name="cifar10", root=None))


def test_loader_order_and_augmentation_are_seeded_by_epoch_and_step():
    d = load_data(DataSection(name="synthetic", image_size=8))
    make = lambda: Loader(d.train, 32, d.mean, d.std, shuffle=True, seed=3, crop_padding=2, flip=True)  # noqa: E731
    a = list(make().batches(epoch=1))
    b = list(make().batches(epoch=1, start=5))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a[5:], b))
    c = list(make().batches(epoch=2))
    assert not torch.equal(a[0][1], c[0][1])


def test_the_loader_normalises_by_the_datasets_mean_and_std():
    """A batch is (x / 255 - mean) / std per channel, in the split's order without shuffling."""
    d = load_data(DataSection(name="synthetic", image_size=8))
    (x, y), *_ = Loader(d.train, 16, d.mean, d.std, shuffle=False).batches()
    mean, std = torch.tensor(d.mean).view(1, -1, 1, 1), torch.tensor(d.std).view(1, -1, 1, 1)
    torch.testing.assert_close(x, (d.train.x[:16].float() / 255 - mean) / std)
    assert torch.equal(y, d.train.y[:16]) and float(std.min()) != 1.0
