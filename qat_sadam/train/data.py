"""Datasets held in memory as uint8 NCHW tensors, and a seeded batch loader with batched augmentation.

Every dataset here fits in memory (CIFAR: 150 MB), so the loader slices tensors instead of
running torchvision transforms per sample through a DataLoader: on a 2-core machine the per-sample
path costs more than the network. Random crop and flip are applied per sample, on the batch.
Order and augmentation come from generators seeded by (seed, epoch, step), so a resumed run
sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from ..errors import DataError, RecipeError
from .datafiles import check_images, check_labels, check_same_classes, decode_jpegs, npz_arrays, read_image

if TYPE_CHECKING:  # recipe.py builds on this module (DATASETS): the section type is for annotations only
    from .recipe import DataSection

DATASETS = ("synthetic", "digits", "shapes", "cifar10", "cifar100", "tinyimagenet")
_CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
_CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}


@dataclass
class Split:
    x: torch.Tensor  # uint8 (N, C, H, W)
    y: torch.Tensor  # int64 (N,), or (N, H, W) for segmentation


@dataclass
class Data:
    train: Split
    test: Split
    num_classes: int
    mean: tuple
    std: tuple

    @property
    def in_channels(self) -> int:
        return self.train.x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.x.shape[-1]

    @property
    def task(self) -> str:
        return "segmentation" if self.train.y.dim() == 3 else "classification"


def data_root(cfg: DataSection) -> str | None:
    return cfg.root or os.environ.get("QAT_SADAM_DATA")


def _split(x: np.ndarray, y: np.ndarray) -> Split:
    """From NHWC uint8 (or NHW) numpy arrays."""
    x = torch.from_numpy(np.ascontiguousarray(x))
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return Split(x.contiguous(), torch.from_numpy(np.asarray(y)).long())


def _synthetic(
    image_size: int = 16, classes: int = 10, n_train: int = 1024, n_test: int = 512
) -> tuple[Split, Split, int]:
    """Class templates plus noise: learnable, deterministic, no files."""
    g = torch.Generator().manual_seed(1234)
    templates = torch.rand(classes, 3, image_size, image_size, generator=g)

    def make(n):
        y = torch.randint(0, classes, (n,), generator=g)
        x = 0.6 * templates[y] + 0.4 * torch.rand(n, 3, image_size, image_size, generator=g)
        return Split((x * 255).round().to(torch.uint8), y)

    return make(n_train), make(n_test), classes


SHAPES = ("background", "disc", "square", "triangle")


def _shapes(image_size: int = 32, n_train: int = 2048, n_test: int = 512) -> tuple[Split, Split, int]:
    """Segmentation without files: 1-3 discs, squares and triangles of random colours, sizes and
    places on a noisy background of another colour, each pixel labelled with the shape on top
    (``SHAPES``). The colour says nothing about the class: the shape does."""
    g = torch.Generator().manual_seed(4321)
    yy, xx = torch.meshgrid(torch.arange(image_size), torch.arange(image_size), indexing="ij")

    def make(n):
        x = torch.rand(n, 3, 1, 1, generator=g) * 0.5 + 0.1 * torch.rand(n, 3, image_size, image_size, generator=g)
        y = torch.zeros(n, image_size, image_size, dtype=torch.long)
        for _ in range(3):
            on = torch.rand(n, generator=g) < 0.75
            kind = torch.randint(1, len(SHAPES), (n,), generator=g)
            r = torch.randint(image_size // 8, image_size // 3, (n,), generator=g).float()
            cy, cx = (torch.rand(2, n, generator=g) * (image_size - 1)).unbind()
            dy, dx = yy - cy.view(-1, 1, 1), xx - cx.view(-1, 1, 1)
            r3 = r.view(-1, 1, 1)
            inside = torch.stack(
                [
                    dy.square() + dx.square() < r3.square(),
                    (dy.abs() < r3 * 0.8) & (dx.abs() < r3 * 0.8),
                    (dy > -r3) & (dy < r3) & (dx.abs() < (dy + r3) / 2),
                ]
            )[kind - 1, torch.arange(n)] & on.view(-1, 1, 1)
            colour = 0.4 + 0.6 * torch.rand(n, 3, 1, 1, generator=g)
            x = torch.where(inside[:, None], colour, x)
            y = torch.where(inside, kind.view(-1, 1, 1), y)
        return Split((x.clamp(0, 1) * 255).round().to(torch.uint8), y)

    return make(n_train), make(n_test), len(SHAPES)


def _digits() -> tuple[Split, Split, int]:
    from sklearn.datasets import load_digits  # scikit-learn takes a second to import: only for digits

    d = load_digits()
    x = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], d.target[perm]
    return _split(x[:1500], y[:1500]), _split(x[1500:], y[1500:]), 10


def _cifar(name: str, cfg: DataSection) -> tuple[Split, Split, int]:
    classes = 100 if name == "cifar100" else 10
    root = data_root(cfg)
    where = root or "(no data.root and no QAT_SADAM_DATA)"
    parts = sorted(glob.glob(os.path.join(root, f"{name}_train*.npz"))) if root else []
    test = os.path.join(root, f"{name}_test.npz") if root else ""
    if parts and os.path.isfile(test):
        train = [_labelled_images(p, classes) for p in parts]
        x_test, y_test = _labelled_images(test, classes)
        y_train = np.concatenate([y for _, y in train])
        check_same_classes(", ".join(parts), y_train, test, y_test)
        return _split(np.concatenate([x for x, _ in train]), y_train), _split(x_test, y_test), classes
    cls = torchvision.datasets.CIFAR100 if name == "cifar100" else torchvision.datasets.CIFAR10
    if root is None and not cfg.download:
        raise DataError(
            f"{name}: no data found {where}; set data.root (or QAT_SADAM_DATA) to a folder holding "
            f"{name}_train*.npz + {name}_test.npz or torchvision's {name} files, or set data.download: true"
        )
    try:
        sets = [cls(root or "data", train=t, download=bool(cfg.download)) for t in (True, False)]
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise DataError(
            f"{name}: not found under {where} ({e}); put {name}_train*.npz + {name}_test.npz or "
            f"torchvision's files there, or set data.download: true"
        ) from None
    except OSError as e:  # download attempted offline
        raise DataError(
            f"{name}: download failed ({e.__class__.__name__}: {e}); this machine may be offline: "
            f"put the files under {root or 'data'} and set data.download: false"
        ) from None
    return _split(sets[0].data, sets[0].targets), _split(sets[1].data, sets[1].targets), classes


def _labelled_images(path: str, classes: int) -> tuple[np.ndarray, np.ndarray]:
    a = npz_arrays(path, ("x", "y"))
    check_images(path, "x", a["x"], (32, 32, 3))
    check_labels(path, "y", a["y"], len(a["x"]), classes)
    return a["x"], a["y"].astype(np.int64)


_TINY_KEYS = ("train_jpeg", "train_offsets", "y_train", "val_jpeg", "val_offsets", "y_val")


def _decoded_tinyimagenet(npz: str) -> dict[str, np.ndarray]:
    z = npz_arrays(npz, _TINY_KEYS)
    out = {
        "xtr": decode_jpegs(npz, "train_jpeg", z["train_jpeg"], z["train_offsets"]),
        "xte": decode_jpegs(npz, "val_jpeg", z["val_jpeg"], z["val_offsets"]),
    }
    check_labels(npz, "y_train", z["y_train"], len(out["xtr"]), 200)
    check_labels(npz, "y_val", z["y_val"], len(out["xte"]), 200)
    check_same_classes(f"{npz} (train)", z["y_train"], f"{npz} (val)", z["y_val"])
    return {**out, "ytr": z["y_train"], "yte": z["y_val"]}


def _tinyimagenet(cfg: DataSection) -> tuple[Split, Split, int]:
    root = data_root(cfg)
    npz = os.path.join(root, "tinyimagenet_subset.npz") if root else ""
    if os.path.isfile(npz):
        cache = os.path.join(os.environ.get("QAT_SADAM_CACHE", ".cache"), "tinyimagenet_subset_decoded.npz")
        if not os.path.isfile(cache):
            decoded = _decoded_tinyimagenet(npz)
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            tmp = cache + ".tmp.npz"
            np.savez(tmp, **decoded)
            os.replace(tmp, cache)
        c = npz_arrays(cache, ("xtr", "ytr", "xte", "yte"))
        return _split(c["xtr"], c["ytr"].astype(np.int64)), _split(c["xte"], c["yte"].astype(np.int64)), 200
    if root and os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val")):
        sets = [_image_folder(os.path.join(root, s)) for s in ("train", "val")]
        if sets[0].classes != sets[1].classes:
            raise DataError(f"tinyimagenet: {root}/val must be an ImageFolder with the classes of {root}/train")
        return _folder_split(sets[0]), _folder_split(sets[1]), len(sets[0].classes)
    raise DataError(
        f"tinyimagenet: no data under {root or '(no data.root and no QAT_SADAM_DATA)'}; expected "
        "tinyimagenet_subset.npz or an ImageFolder layout with train/ and val/ class folders"
    )


def _image_folder(path: str):
    try:
        return torchvision.datasets.ImageFolder(path)
    except (FileNotFoundError, OSError) as e:  # an empty class folder, no class folders at all
        raise DataError(f"{path}: not a usable ImageFolder ({str(e).splitlines()[0][:200]})") from None


def _folder_split(ds) -> Split:
    images = [read_image(p) for p, _ in ds.samples]
    if len({im.shape for im in images}) > 1:
        raise DataError(f"{ds.root}: the images do not all have one size")
    return _split(np.stack(images), ds.targets)


def _first_classes(split: Split, n: int) -> Split:
    keep = split.y < n
    return Split(split.x[keep], split.y[keep])


def load_data(cfg: DataSection) -> Data:
    """The dataset a recipe's ``data`` section (``recipe.DataSection``) names, with its subset and
    validation split applied."""
    name = cfg.name
    if name == "synthetic":
        train, test, classes = _synthetic(cfg.image_size or 16)
    elif name == "digits":
        train, test, classes = _digits()
    elif name == "shapes":
        train, test, classes = _shapes(cfg.image_size or 32)
    elif name in ("cifar10", "cifar100"):
        train, test, classes = _cifar(name, cfg)
    elif name == "tinyimagenet":
        train, test, classes = _tinyimagenet(cfg)
    else:
        raise RecipeError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if cfg.classes:
        # The first N classes, whole: a smaller problem that a CPU budget can still learn, unlike
        # a few images of every class.
        if train.y.dim() > 1:
            raise RecipeError(f"data.classes keeps whole classes of a classification dataset; {name} labels pixels")
        if cfg.classes > classes:
            raise RecipeError(f"data.classes is {cfg.classes} but {name} has {classes} classes")
        train, test, classes = _first_classes(train, cfg.classes), _first_classes(test, cfg.classes), cfg.classes
    if cfg.subset:
        train = Split(train.x[: cfg.subset], train.y[: cfg.subset])
    if cfg.val_split:
        # A fixed split (seed 0), the same for every run, carved from the training set.
        perm = torch.randperm(len(train.y), generator=torch.Generator().manual_seed(0))
        n_val = int(round(len(perm) * cfg.val_split))
        val, keep = perm[:n_val], perm[n_val:]
        if cfg.eval_on == "val":
            test = Split(train.x[val], train.y[val])
        train = Split(train.x[keep], train.y[keep])
    if cfg.test_subset:
        test = Split(test.x[: cfg.test_subset], test.y[: cfg.test_subset])
    if name in _CIFAR_MEAN:
        mean, std = _CIFAR_MEAN[name], _CIFAR_STD[name]
    else:
        xf = train.x.float().div_(255)
        mean = tuple(xf.mean(dim=(0, 2, 3)).tolist())
        std = tuple(xf.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    return Data(train, test, classes, mean, std)


class Loader:
    """Batches of normalised float images from a uint8 Split, seeded by (seed, epoch, step)."""

    def __init__(
        self,
        split: Split,
        batch_size: int,
        mean,
        std,
        *,
        shuffle: bool,
        seed: int = 0,
        crop_padding: int = 0,
        flip: bool = False,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world: int = 1,
    ):
        self.device = torch.device(device)
        on_device = self.device.type == "cuda"
        self.x = split.x.to(self.device) if on_device else split.x
        self.y = split.y.to(self.device) if on_device else split.y
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.crop_padding, self.flip = crop_padding, flip
        self.rank, self.world = rank, world
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def batches(self, epoch: int = 0, start: int = 0):
        n = len(self.y)
        order = (
            torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            if self.shuffle
            else torch.arange(n)
        )
        for step in range(start, len(self)):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size].to(self.x.device)
            x, y = self.x[idx], self.y[idx]
            if self.crop_padding or self.flip:  # drawn for the global batch, so each rank's share is the same
                g = torch.Generator().manual_seed((self.seed * 100_003 + epoch) * 1_000_003 + step)
                x, y = self._augment(x, y, g)
            if self.world > 1:
                x, y = x[self.rank :: self.world], y[self.rank :: self.world]
            x = x.to(self.device, non_blocking=True).float().div_(255).sub_(self.mean).div_(self.std)
            yield x, y.to(self.device, non_blocking=True)

    def _augment(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random crops of the padded images and horizontal flips; a dense label map moves with its
        image (padded as background, class 0)."""
        b, c, h, w = x.shape
        dense = y.dim() == 3
        if self.crop_padding:
            p = self.crop_padding
            xp = F.pad(x, (p, p, p, p))
            offsets = torch.randint(0, 2 * p + 1, (b, 2), generator=g).tolist()
            x = torch.stack([xp[i, :, oy : oy + h, ox : ox + w] for i, (oy, ox) in enumerate(offsets)])
            if dense:
                yp = F.pad(y, (p, p, p, p))
                y = torch.stack([yp[i, oy : oy + h, ox : ox + w] for i, (oy, ox) in enumerate(offsets)])
        if self.flip:
            mask = (torch.rand(b, generator=g) < 0.5).to(x.device)
            x = torch.where(mask[:, None, None, None], x.flip(3), x)
            if dense:
                y = torch.where(mask[:, None, None], y.flip(2), y)
        return x, y
