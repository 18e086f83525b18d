"""Your own arrays: an ``.npz`` file with ``x`` and ``y`` (and optionally ``x_test``, ``y_test``)."""

from __future__ import annotations

import zipfile
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
    try:
        loaded = np.load(path, allow_pickle=False)  # no pickles: an .npz of plain arrays cannot run code
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("it holds one array, not named arrays")
        with loaded:
            arrays = dict(loaded)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        reason = getattr(err, "strerror", None) or " ".join(str(err).split()) or type(err).__name__
        if "pickle" in reason:  # numpy's last guess for a file that is neither .npz nor .npy
            reason = "not a zip archive of arrays"
        raise ValueError(
            f"{path} is not a readable .npz file ({reason}): write it with numpy.savez(path, x=..., y=...)"
        ) from err
    for key in ("x", "y"):
        if key not in arrays:
            raise ValueError(f"{path} has no array {key!r} (it has {sorted(arrays)}); expected x, y[, x_test, y_test]")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise ValueError(f"{path} must hold both x_test and y_test or neither")

    def dataset(x: str, y: str) -> ArrayDataset:
        inputs, labels = arrays[x], arrays[y]
        if inputs.ndim < 2 or not (np.issubdtype(inputs.dtype, np.number) or inputs.dtype == bool):
            raise ValueError(
                f"{path}: {x} is {inputs.dtype} {inputs.shape} but must be numbers with one row per sample, "
                "N×features or N×C×H×W"
            )
        if not np.isfinite(inputs).all():  # would only surface later, as a NaN loss
            bad = np.flatnonzero(~np.isfinite(inputs.reshape(len(inputs), -1)).all(axis=1))
            raise ValueError(f"{path}: {x} has NaN or infinite values in {len(bad)} samples (the first: row {bad[0]})")
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.min(initial=0) < 0:
            raise ValueError(
                f"{path}: {y} is {labels.dtype} {labels.shape} but must be a 1-D array of non-negative integer labels"
            )
        if len(inputs) != len(labels):
            raise ValueError(f"{path}: {x} has {len(inputs)} samples but {y} has {len(labels)} labels")
        return ArrayDataset(torch.from_numpy(inputs).float(), torch.from_numpy(labels).long())

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
    for split, part in (("training", train), ("test", test)):
        if len(part) == 0:
            raise ValueError(f"{path}: 0 {split} samples (inputs {tuple(part.x.shape)}): every split needs samples")
    num_classes = int(max(train.y.max(), test.y.max())) + 1
    return DataSplits(path.stem, train, test, num_classes=num_classes, input_shape=tuple(train.x.shape[1:]))
