"""Datasets held as tensors on the training device, batched and augmented there.

Small datasets (MNIST-1D, Fashion-MNIST, CIFAR) fit in device memory, so a GPU never waits on a DataLoader:
each epoch is one ``randperm`` and every batch is an index into resident tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from fisherkd.core import UNLABELLED
from fisherkd.data.common import epoch_order


@dataclass
class ArrayDataset:
    """Inputs ``x`` (float32, N×…) and integer labels ``y`` (N)."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"dataset has {len(self.x)} inputs but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> ArrayDataset:
        return ArrayDataset(self.x.to(device), self.y.to(device))


@dataclass
class DataSplits:
    """Train and test splits of one dataset, with what a model needs to know about it."""

    name: str
    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    input_shape: tuple[int, ...]

    def with_hidden_labels(self, labelled: int, seed: int = 0) -> DataSplits:
        """The same inputs with the labels of all but ``labelled`` training samples (a fixed random choice) set to
        -100: transfer inputs that only the teacher labels."""
        if not 0 < labelled <= len(self.train):
            raise ValueError(f"data.labelled={labelled}: give between 1 and the {len(self.train)} training samples")
        keep = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed))[:labelled]
        y = torch.full_like(self.train.y, UNLABELLED)
        y[keep] = self.train.y[keep]
        return DataSplits(self.name, ArrayDataset(self.train.x, y), self.test, self.num_classes, self.input_shape)

    def with_transfer(self, inputs: Tensor) -> DataSplits:
        """The training split plus unlabelled ``inputs`` (label -100)."""
        x = torch.cat([self.train.x, inputs.to(self.train.x.dtype)])
        y = torch.cat([self.train.y, torch.full((len(inputs),), UNLABELLED, dtype=self.train.y.dtype)])
        return DataSplits(self.name, ArrayDataset(x, y), self.test, self.num_classes, self.input_shape)

    def with_class_groups(self, groups: list[list[int]]) -> DataSplits:
        """A few-class task: each label replaced by the index of the group that holds it (-100 stays -100)."""
        flat = [c for group in groups for c in group]
        missing = sorted(set(range(self.num_classes)) - set(flat))
        repeated = sorted({c for c in flat if flat.count(c) > 1})
        unknown = sorted(c for c in set(flat) if not 0 <= c < self.num_classes)
        if len(groups) < 2 or missing or repeated or unknown:
            raise ValueError(
                f"data.class_groups must put each of the {self.num_classes} classes of {self.name} in exactly one of "
                f"at least 2 groups: missing {missing}, repeated {repeated}, unknown {unknown}"
            )
        table = torch.empty(self.num_classes, dtype=torch.long)
        for index, group in enumerate(groups):
            table[group] = index

        def regroup(data: ArrayDataset) -> ArrayDataset:
            labelled = data.y != UNLABELLED
            y = data.y.clone()
            y[labelled] = table.to(y.device)[data.y[labelled]].to(y.dtype)
            return ArrayDataset(data.x, y)

        return DataSplits(self.name, regroup(self.train), regroup(self.test), len(groups), self.input_shape)

    def labelled_only(self) -> DataSplits:
        """Only the training samples that have a label (what a teacher trains on)."""
        keep = self.train.y != UNLABELLED
        if bool(keep.all()):
            return self
        train = ArrayDataset(self.train.x[keep], self.train.y[keep])
        return DataSplits(self.name, train, self.test, self.num_classes, self.input_shape)

    @property
    def has_unlabelled(self) -> bool:
        return bool((self.train.y == UNLABELLED).any())

    def with_train_subset(self, size: int, seed: int = 0) -> DataSplits:
        """The same splits with ``size`` training samples drawn once, by ``seed``, without replacement."""
        if size > len(self.train):
            raise ValueError(f"train_subset={size} exceeds the {len(self.train)} training samples of {self.name}")
        keep = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed))[:size]
        train = ArrayDataset(self.train.x[keep], self.train.y[keep])
        return DataSplits(self.name, train, self.test, self.num_classes, self.input_shape)

    @property
    def in_channels(self) -> int:
        return self.input_shape[0] if len(self.input_shape) == 3 else 1


@dataclass
class Batch:
    x: Tensor
    y: Tensor
    index: Tensor


class DeviceLoader:
    """Batches of a resident :class:`ArrayDataset`. The order of epoch e depends only on (seed, e), so a run
    resumed mid-epoch sees exactly the batches it would have seen (``epoch(e, start=k)`` skips k batches)."""

    def __init__(
        self,
        data: ArrayDataset,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        # Static shapes: dropping the last partial batch keeps every step identical (and CUDA-graph friendly).
        self.drop_last = drop_last and len(data) >= batch_size
        self.seed = seed
        # Under DDP every rank walks the same global order and keeps its slice of each global batch.
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> Tensor:
        return epoch_order(len(self.data), self.seed, epoch, self.shuffle).to(self.data.y.device)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        order = self.order(epoch)
        for b in range(start, len(self)):
            index = order[b * self.batch_size : (b + 1) * self.batch_size][self.rank :: self.world_size]
            yield Batch(self.data.x[index], self.data.y[index], index)
