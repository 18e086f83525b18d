"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) from the "python version" pickles of
https://www.cs.toronto.edu/~kriz/cifar.html (cifar-10-python.tar.gz, cifar-100-python.tar.gz)."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fisherkd.data.common import normalize_images, require_path
from fisherkd.data.core import ArrayDataset, DataSplits


@dataclass(frozen=True)
class CifarLayout:
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: bytes
    num_classes: int
    archive: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# Means and stds: per-channel statistics of all training pixels in [0, 1]. CIFAR-10's are the exact values (the
# widespread std (0.2023, 0.1994, 0.2010) is a mean of per-image stds, not the pixel std); CIFAR-100's are the
# ones used by the standard KD benchmark code (Tian et al., CRD / RepDistiller, ICLR 2020).
LAYOUTS = {
    "cifar10": CifarLayout(
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_file="test_batch",
        label_key=b"labels",
        num_classes=10,
        archive="cifar-10-python.tar.gz",
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": CifarLayout(
        folder="cifar-100-python",
        train_files=("train",),
        test_file="test",
        label_key=b"fine_labels",
        num_classes=100,
        archive="cifar-100-python.tar.gz",
        mean=(0.5071, 0.4867, 0.4408),
        std=(0.2675, 0.2565, 0.2761),
    ),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches hold (dicts, lists, bytes, numpy arrays), so a tampered file cannot run
    code the way a plain ``pickle.load`` would let it."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("_codecs", "encode"),  # how Python 3 writes bytes in protocol-2 pickles
    }

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise FileNotFoundError(f"CIFAR batch file {path.name} missing from {path.parent}")
    try:
        with path.open("rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"corrupt CIFAR batch file {path}: {type(error).__name__}: {error}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(f"corrupt CIFAR batch file {path}: data {data.shape}, {len(labels)} labels")
    # Each row is the 1024 red, then 1024 green, then 1024 blue values of a 32×32 image, row-major.
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(name: str, root: str | Path | None = None) -> DataSplits:
    """``cifar10`` or ``cifar100``: 3×32×32 images normalised per channel, 50000 train / 10000 test.

    ``root`` is the directory containing the extracted folder (``cifar-10-batches-py`` or ``cifar-100-python``)
    or that folder itself; default: the current directory. CIFAR-100 uses its 100 fine labels.
    """
    layout = LAYOUTS[name]
    how = f"download {layout.archive} from https://www.cs.toronto.edu/~kriz/cifar.html, extract it and pass root="
    root = Path(root or ".").expanduser()
    folder = root if root.name == layout.folder else root / layout.folder
    require_path(folder, f"{name} folder {layout.folder}", how)

    def split(files: tuple[str, ...]) -> ArrayDataset:
        parts = [_read_batch(folder / file, layout.label_key) for file in files]
        images = np.concatenate([images for images, _ in parts])
        labels = np.concatenate([labels for _, labels in parts])
        if labels.min(initial=0) < 0 or labels.max(initial=0) >= layout.num_classes:
            raise ValueError(f"{name} labels outside 0..{layout.num_classes - 1} in {folder}")
        return ArrayDataset(normalize_images(images, layout.mean, layout.std), torch.from_numpy(labels))

    train, test = split(layout.train_files), split((layout.test_file,))
    return DataSplits(name, train, test, num_classes=layout.num_classes, input_shape=(3, 32, 32))
