"""Dataset names → loaders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fisherkd.data.core import DataSplits
from fisherkd.data.mnist1d import load_mnist1d
from fisherkd.methods.base import nearest

LOADERS: dict[str, Callable[..., DataSplits]] = {
    "mnist1d": lambda root=None: load_mnist1d(),
}


def available_datasets() -> list[str]:
    return sorted(LOADERS)


def load_dataset(name: str, root: str | Path | None = None) -> DataSplits:
    """Load a dataset by name; ``root`` is its directory (or file) where it has one."""
    if name not in LOADERS:
        raise KeyError(f"unknown dataset {name!r}; {nearest(name, LOADERS)}")
    return LOADERS[name](root=root)
