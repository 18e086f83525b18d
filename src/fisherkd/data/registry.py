"""Dataset names → loaders, and :func:`make_loader`, which batches either kind of splits."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from fisherkd.core import nearest
from fisherkd.data.cifar import load_cifar
from fisherkd.data.core import DataSplits, DeviceLoader
from fisherkd.data.fashion_mnist import load_fashion_mnist
from fisherkd.data.folder import FolderLoader, FolderSplits, load_image_folder
from fisherkd.data.mnist1d import load_mnist1d, mnist1d_transfer
from fisherkd.data.npz import load_npz

if TYPE_CHECKING:
    from fisherkd.config import DataConfig

# Every loader takes ``root`` (its directory or file; None = its default, where it has one) and keyword options.
LOADERS: dict[str, Callable[..., DataSplits | FolderSplits]] = {
    "mnist1d": lambda root=None, **options: load_mnist1d(**options),
    "fashion_mnist": load_fashion_mnist,
    "cifar10": partial(load_cifar, "cifar10"),
    "cifar100": partial(load_cifar, "cifar100"),
    "npz": load_npz,
    "image_folder": load_image_folder,
}


def available_datasets() -> list[str]:
    return sorted(LOADERS)


def load_dataset(name: str, root: str | Path | None = None, **options: Any) -> DataSplits | FolderSplits:
    """Load a dataset by name; ``root`` is its directory (or file) where it has one; ``options`` go to its loader
    (e.g. ``image_size`` for ``image_folder``, ``seed`` for ``npz``).

    Array datasets come back as :class:`DataSplits` (tensors, moved to the device whole), image folders as
    :class:`FolderSplits` (read from disk); :func:`make_loader` batches both.
    """
    if name not in LOADERS:
        raise KeyError(f"unknown dataset {name!r}; {nearest(name, LOADERS)}")
    return LOADERS[name](root=root, **options)


def make_loader(
    splits: DataSplits | FolderSplits,
    split: Literal["train", "test"],
    batch_size: int,
    shuffle: bool = True,
    drop_last: bool = True,
    seed: int = 0,
    device: torch.device | str = "cpu",
    num_workers: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> DeviceLoader | FolderLoader:
    """Batches of one split on ``device``: a :class:`DeviceLoader` over resident tensors for array datasets, a
    :class:`FolderLoader` (DataLoader workers; ``num_workers`` applies only to it) for image folders. Both have
    ``len()`` and ``epoch(e, start=0)`` yielding :class:`Batch`, in an order fixed by (seed, e). With
    ``world_size`` > 1 each rank gets its slice of every global batch of ``batch_size`` samples."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if isinstance(splits, FolderSplits):
        return splits.loader(split, batch_size, shuffle, drop_last, seed, device, num_workers, rank, world_size)
    data = splits.train if split == "train" else splits.test
    return DeviceLoader(data.to(device), batch_size, shuffle, drop_last, seed, rank, world_size)


def load_splits(config: DataConfig) -> DataSplits | FolderSplits:
    """The dataset a run config names, with its training subset when it asks for one."""
    splits = load_dataset(config.name, config.root)
    asked = [k for k in ("train_subset", "labelled", "transfer", "class_groups") if getattr(config, k) is not None]
    if asked and not isinstance(splits, DataSplits):
        raise ValueError(f"data.{asked[0]} works on array datasets, not on {config.name!r}")
    if config.class_groups is not None:
        splits = splits.with_class_groups(config.class_groups)
    if config.train_subset is not None:
        splits = splits.with_train_subset(config.train_subset)
    if config.labelled is not None:
        splits = splits.with_hidden_labels(config.labelled)
    if config.transfer is not None:
        if config.name != "mnist1d":
            raise ValueError(
                f"data.transfer draws inputs from the dataset's generator, which only mnist1d has, not "
                f"{config.name!r}: use data.labelled to turn part of the training split into transfer inputs"
            )
        splits = splits.with_transfer(mnist1d_transfer(config.transfer))
    return splits
