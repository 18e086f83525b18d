"""Fashion-MNIST (Xiao et al. 2017) from its IDX files, e.g. as installed by Debian's ``dataset-fashion-mnist``."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from fisherkd.data.common import normalize_images, require_path
from fisherkd.data.core import ArrayDataset, DataSplits

# Where `apt-get install dataset-fashion-mnist` puts the four .gz files (checked with `dpkg -c` on
# dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb, Debian bookworm).
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")

# Mean and std of all training pixels in [0, 1]; computed here from the Debian package's train-images file
# (0.28604, 0.35302), and the values commonly quoted for Fashion-MNIST.
MEAN = (0.2860,)
STD = (0.3530,)

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one IDX file (gzipped or not) of unsigned bytes; any inconsistency is a one-line ValueError."""
    try:
        with gzip.open(path) if path.suffix == ".gz" else path.open("rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError; a truncated stream is an EOFError
        raise ValueError(f"corrupt IDX file {path}: {error}") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
        raise ValueError(f"corrupt IDX file {path}: magic number {found}, expected {magic}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) - header != int(np.prod(shape)):
        raise ValueError(f"corrupt IDX file {path}: header says shape {shape} but it holds {len(data) - header} bytes")
    # copy: frombuffer views immutable bytes, and torch warns on (and cannot share) read-only arrays
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def _find(root: Path, name: str) -> Path:
    """``name`` or ``name.gz`` under root (the Debian package ships .gz; the unpacked originals also occur)."""
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"Fashion-MNIST file {name}[.gz] not found in {root}")


def load_fashion_mnist(root: str | Path | None = None) -> DataSplits:
    """60000 train / 10000 test 1×28×28 images, 10 classes, normalised with the training mean/std.

    ``root`` is the directory holding the four IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz``); default
    ``/usr/share/datasets/fashion-mnist``.
    """
    root = require_path(
        root or DEFAULT_ROOT,
        "Fashion-MNIST directory",
        "install it with `sudo apt-get install dataset-fashion-mnist` or pass root= the folder of its IDX files",
    )

    def split(prefix: str) -> ArrayDataset:
        images_path = _find(root, f"{prefix}-images-idx3-ubyte")
        labels_path = _find(root, f"{prefix}-labels-idx1-ubyte")
        images = read_idx(images_path, IMAGES_MAGIC)
        labels = read_idx(labels_path, LABELS_MAGIC)
        if len(images) != len(labels):
            raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
        if labels.max(initial=0) > 9:
            raise ValueError(f"corrupt IDX file {labels_path}: label {labels.max()} outside 0..9")
        x = normalize_images(images[:, None], MEAN, STD)
        return ArrayDataset(x, torch.from_numpy(labels.astype(np.int64)))

    train, test = split("train"), split("t10k")
    return DataSplits("fashion_mnist", train, test, num_classes=10, input_shape=tuple(train.x.shape[1:]))
