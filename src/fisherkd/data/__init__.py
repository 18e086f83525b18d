"""Datasets: ``load_dataset(name, root=None)`` returns :class:`DataSplits`; batches come from :class:`DeviceLoader`."""

from fisherkd.data.augment import AugmentConfig, augment
from fisherkd.data.core import ArrayDataset, Batch, DataSplits, DeviceLoader
from fisherkd.data.registry import available_datasets, load_dataset

__all__ = [
    "ArrayDataset",
    "AugmentConfig",
    "Batch",
    "DataSplits",
    "DeviceLoader",
    "augment",
    "available_datasets",
    "load_dataset",
]
