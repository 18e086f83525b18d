"""Your own arrays: an ``.npz`` file with ``x`` and ``y`` (and optionally ``x_test``, ``y_test``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fisherkd.data.common import require_path
from fisherkd.data.core import ArrayDataset, DataSplits


def load_npz(root: str | Path | None = None, seed: int = 0, test_fraction: float = 0.2) -> DataSplits:
    """Load ``root`` (the path of the .npz file) as float32 inputs and int64 labels, used as given (no scaling).

    Without ``x_test``/``y_test`` the samples are split into train and test by a permutation drawn from ``seed``,
    ``test_fraction`` of them (rounded down, at least one) going to test. ``num_classes`` is the largest label + 1
    and ``input_shape`` the shape of one ``x``.
    """
    if root is None:
        raise ValueError("the npz dataset needs root= the path of an .npz file with arrays x and y")
    path = require_path(root, "npz dataset file", "pass root= the path of an .npz file with arrays x and y")
    with np.load(path, allow_pickle=False) as arrays:  # no pickles: an .npz of plain arrays cannot run code
        arrays = dict(arrays)
    for key in ("x", "y"):
        if key not in arrays:
            raise ValueError(f"{path} has no array {key!r} (it has {sorted(arrays)}); expected x, y[, x_test, y_test]")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise ValueError(f"{path} must hold both x_test and y_test or neither")

    def dataset(x: str, y: str) -> ArrayDataset:
        labels = arrays[y]
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.min(initial=0) < 0:
            raise ValueError(f"{path}: {y} must be a 1-D array of non-negative integer labels")
        return ArrayDataset(torch.from_numpy(arrays[x]).float(), torch.from_numpy(labels).long())

    data = dataset("x", "y")
    if "x_test" in arrays:
        train, test = data, dataset("x_test", "y_test")
        if train.x.shape[1:] != test.x.shape[1:]:
            raise ValueError(f"{path}: x is {tuple(train.x.shape)} but x_test is {tuple(test.x.shape)}")
    else:
        if len(data) < 2:
            raise ValueError(f"{path}: need at least 2 samples to split into train and test, got {len(data)}")
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        n_test = max(1, int(len(data) * test_fraction))
        test_index, train_index = order[:n_test], order[n_test:]
        train = ArrayDataset(data.x[train_index], data.y[train_index])
        test = ArrayDataset(data.x[test_index], data.y[test_index])
    num_classes = int(max(train.y.max(), test.y.max())) + 1
    return DataSplits(path.stem, train, test, num_classes=num_classes, input_shape=tuple(train.x.shape[1:]))
