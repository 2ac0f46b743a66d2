"""Dataset files read defensively: every array checked (keys, dtype, shape, label range) before it
is used, every error one line naming the file, the array and the first bad index."""

from __future__ import annotations

import io
import zipfile

import numpy as np
from PIL import Image

from ..errors import DataError

MAX_ARRAY_BYTES = 8 << 30  # a header that claims more than this is a corrupt or foreign file


def npz_arrays(path: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named arrays of an npz file. Each array's header is read first, so a file that claims a
    huge shape is refused before any memory is allocated for it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise DataError(f"{path}: no array {missing[0]!r} (it has {', '.join(z.files) or 'none'})")
            for k in keys:
                with z.zip.open(f"{k}.npy") as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read_header(f)
                if int(np.prod(shape, dtype=np.float64)) * dtype.itemsize > MAX_ARRAY_BYTES:
                    raise DataError(f"{path}: array {k!r} claims shape {shape} ({dtype}), more than 8 GiB")
            return {k: z[k] for k in keys}
    except DataError:
        raise
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError) as e:  # truncated, not a zip, bad header
        raise DataError(
            f"{path}: not a readable npz file ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
        ) from None


def check_images(path: str, key: str, x: np.ndarray, hwc: tuple[int, int, int]) -> None:
    """uint8 images, N x H x W x C with (H, W, C) = ``hwc``, at least one."""
    if x.dtype != np.uint8:
        raise DataError(f"{path}: array {key!r} has dtype {x.dtype}; expected uint8 pixels (0..255)")
    if x.ndim != 4 or x.shape[1:] != tuple(hwc) or x.shape[0] == 0:
        raise DataError(f"{path}: array {key!r} has shape {x.shape}; expected (N, {', '.join(map(str, hwc))}) images")


def check_labels(path: str, key: str, y: np.ndarray, n: int, classes: int) -> None:
    """Integer labels, one per image, each in [0, classes)."""
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: array {key!r} has dtype {y.dtype}; expected integer class labels")
    if y.shape != (n,):
        raise DataError(f"{path}: array {key!r} has shape {y.shape}; expected ({n},), one label per image")
    bad = np.flatnonzero((y < 0) | (y >= classes))
    if bad.size:
        raise DataError(f"{path}: array {key!r} index {bad[0]} holds label {y[bad[0]]}, outside [0, {classes})")


def check_same_classes(train_path: str, train_y: np.ndarray, test_path: str, test_y: np.ndarray) -> None:
    """Every class of the test set appears in the training set."""
    unseen = np.setdiff1d(np.unique(test_y), np.unique(train_y))
    if unseen.size:
        first = int(np.flatnonzero(test_y == unseen[0])[0])
        raise DataError(
            f"{test_path}: label {unseen[0]} (first at index {first}) never occurs in {train_path}: the "
            "training and test files do not share their classes"
        )


def decode_jpegs(path: str, key: str, buf: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Images i = buf[offsets[i]:offsets[i + 1]] decoded to uint8 RGB; a bad image names its index."""
    if (
        offsets.ndim != 1
        or offsets.size < 2
        or np.any(np.diff(offsets) <= 0)
        or offsets[0] < 0
        or offsets[-1] > buf.size
    ):
        raise DataError(f"{path}: the offsets of {key!r} are not increasing positions within its {buf.size} bytes")
    images = []
    for i in range(len(offsets) - 1):
        try:
            images.append(np.asarray(Image.open(io.BytesIO(buf[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB")))
        except (OSError, ValueError) as e:  # PIL: UnidentifiedImageError, truncated image
            raise DataError(f"{path}: image {i} of {key!r} cannot be decoded ({type(e).__name__})") from None
    if len({im.shape for im in images}) > 1:
        raise DataError(f"{path}: the images of {key!r} do not all have one size")
    return np.stack(images)


def read_image(path: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the image ({type(e).__name__})") from None
