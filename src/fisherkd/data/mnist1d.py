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


def mnist1d_transfer(count: int, seed: int = 42) -> torch.Tensor:
    """``count`` more MNIST-1D inputs from the dataset's own generator (other seeds than the split's), for a transfer
    set that only the teacher labels ("function matching", Beyer et al. CVPR 2022). Cached like the split."""
    path = cache_dir() / f"mnist1d_transfer_{count}_seed{seed}.npz"
    if not path.exists():
        from mnist1d.data import get_dataset_args, make_dataset

        parts, have, draw = [], 0, 0
        while have < count:
            draw += 1
            args = get_dataset_args()
            args.seed, args.num_samples = seed + 1000 * draw, 10000  # never the split's own seed
            data = make_dataset(args)
            parts += [data["x"], data["x_test"]]
            have += len(data["x"]) + len(data["x_test"])
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, x=np.concatenate(parts)[:count])
        tmp.replace(path)
    return torch.from_numpy(np.load(path)["x"]).float()
