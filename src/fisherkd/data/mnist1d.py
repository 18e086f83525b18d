"""MNIST-1D (Greydanus 2020), generated procedurally by the ``mnist1d`` package: no download."""

from __future__ import annotations

import numpy as np
import torch

from fisherkd.data.core import ArrayDataset, DataSplits
from fisherkd.paths import cache_dir


def load_mnist1d(seed: int = 42) -> DataSplits:
    """The paper's default split (4000 train / 1000 test, length 40, 10 classes), cached after first generation."""
    path = cache_dir() / f"mnist1d_default_seed{seed}.npz"
    if not path.exists():
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.seed = seed
        data = make_dataset(args)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, x=data["x"], y=data["y"], x_test=data["x_test"], y_test=data["y_test"])
        tmp.replace(path)
    arrays = np.load(path)

    def split(x: str, y: str) -> ArrayDataset:
        return ArrayDataset(torch.from_numpy(arrays[x]).float(), torch.from_numpy(arrays[y]).long())

    return DataSplits("mnist1d", split("x", "y"), split("x_test", "y_test"), num_classes=10, input_shape=(40,))
