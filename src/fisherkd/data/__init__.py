"""Datasets: ``load_dataset(name, root=None)`` returns :class:`DataSplits` (arrays) or :class:`FolderSplits` (image
folders read from disk); ``make_loader`` batches either (:class:`DeviceLoader` / :class:`FolderLoader`). GLUE text
tasks load with :func:`load_glue` and :func:`tokenize_glue`."""

from fisherkd.data.augment import AugmentConfig, augment
from fisherkd.data.cifar import load_cifar
from fisherkd.data.common import normalize_images
from fisherkd.data.core import ArrayDataset, Batch, DataSplits, DeviceLoader
from fisherkd.data.fashion_mnist import load_fashion_mnist
from fisherkd.data.folder import FolderLoader, FolderSplits, ImageFolderDataset, load_image_folder
from fisherkd.data.glue import GLUE_TASKS, GlueExamples, GlueSplits, load_glue, tokenize_glue
from fisherkd.data.mnist1d import load_mnist1d
from fisherkd.data.npz import load_npz
from fisherkd.data.registry import LOADERS, available_datasets, load_dataset, load_splits, make_loader

__all__ = [
    "GLUE_TASKS",
    "LOADERS",
    "ArrayDataset",
    "AugmentConfig",
    "Batch",
    "DataSplits",
    "DeviceLoader",
    "FolderLoader",
    "FolderSplits",
    "GlueExamples",
    "GlueSplits",
    "ImageFolderDataset",
    "augment",
    "available_datasets",
    "load_cifar",
    "load_dataset",
    "load_splits",
    "load_fashion_mnist",
    "load_glue",
    "load_image_folder",
    "load_mnist1d",
    "load_npz",
    "make_loader",
    "normalize_images",
    "tokenize_glue",
]
