"""ImageNet-style image folders (``root/train/<class>/*.JPEG``, ``root/val/<class>/*``), read from disk.

Such datasets do not fit in device memory, so unlike the array datasets they are torch Datasets decoded with PIL
in DataLoader workers. :class:`FolderLoader` has the iteration interface of :class:`DeviceLoader` (``len``,
``epoch(e, start)`` yielding :class:`Batch`), so the training loop does not care which kind it has:
:func:`fisherkd.data.make_loader` builds the right one for either kind of splits.

Workers ship uint8 images (4× less host-to-device traffic than float32); the loader normalises them on the device.
Augmentation randomness is keyed by (seed, epoch, sample index) rather than drawn from worker state, so an epoch's
batches, crops included, are the same for any number of workers and after a resume.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from fisherkd.data.common import epoch_order, normalize_images, require_path
from fisherkd.data.core import Batch

# ImageNet per-channel mean and std of training pixels in [0, 1], as used by torchvision's pretrained models.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}

# A sample key: the dataset index, or the index and the seed of its augmentation.
SampleKey = int | tuple[int, str]


def _list_images(split_dir: Path, class_to_index: dict[str, int]) -> list[tuple[Path, int]]:
    samples = []
    for name in sorted(class_to_index):
        class_dir = split_dir / name
        if class_dir.is_dir():
            files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            samples += [(path, class_to_index[name]) for path in files]
    if not samples:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the class folders of {split_dir}")
    return samples


def _random_resized_box(
    width: int, height: int, rng: random.Random, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """Inception-style crop box (left, top, right, bottom): a random area fraction in ``scale`` and aspect ratio
    in ``ratio`` (log-uniform); after 10 misses, the largest centred box of a valid ratio (torchvision's rule)."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    w, h = width, height
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class ImageFolderDataset(Dataset):
    """Images of one split, each returned as ``(uint8 3×S×S tensor, label, index)``.

    Training (``train=True``): random-resized crop (scale 0.08–1, ratio 3/4–4/3) to ``image_size`` and a random
    horizontal flip. Evaluation: resize the shorter side to ``resize_size`` and take the centred ``image_size``
    square (done as one resampling of the equivalent box). Items are indexed by ``i`` or by ``(i, seed)``; with a
    seed the augmentation is a function of (seed, i) alone.
    """

    def __init__(
        self,
        samples: list[tuple[Path, int]],
        image_size: int = 224,
        resize_size: int | None = None,
        train: bool = False,
    ) -> None:
        self.samples = samples
        self.image_size = image_size
        # 224/256 = 0.875 is the standard ImageNet evaluation crop ratio.
        self.resize_size = resize_size or round(image_size / 0.875)
        self.train = train

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __getitem__(self, key: SampleKey) -> tuple[Tensor, int, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        with Image.open(path) as file:
            image = file.convert("RGB")
        size = (self.image_size, self.image_size)
        width, height = image.size
        if self.train:
            rng = random.Random(None if seed is None else f"{seed}:{index}")
            box = _random_resized_box(width, height, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
            image = image.resize(size, Image.Resampling.BILINEAR, box=box)
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            side = min(width, height) * self.image_size / self.resize_size  # the crop, in source pixels
            left, top = (width - side) / 2, (height - side) / 2
            image = image.resize(size, Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        return pixels, label, index


class _EpochBatchSampler(Sampler[list[tuple[int, str]]]):
    """Batches of sample keys for the epoch the loader last asked for. It lives in the main process, so persistent
    workers need no notice of the epoch change. (It must not refer back to the loader: in a reference cycle the
    workers are only shut down by the garbage collector, which takes seconds.)"""

    def __init__(
        self, size: int, batch_size: int, num_batches: int, shuffle: bool, seed: int, rank: int, world_size: int
    ) -> None:
        self.size, self.batch_size, self.num_batches = size, batch_size, num_batches
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start = 0

    def __len__(self) -> int:
        return self.num_batches - self.start

    def __iter__(self) -> Iterator[list[tuple[int, str]]]:
        order = epoch_order(self.size, self.seed, self.epoch, self.shuffle).tolist()
        key = f"{self.seed}:{self.epoch}"
        for b in range(self.start, self.num_batches):
            # under DDP every rank walks the same global order and keeps its slice of each global batch
            batch = order[b * self.batch_size : (b + 1) * self.batch_size][self.rank :: self.world_size]
            yield [(i, key) for i in batch]


class FolderLoader:
    """Batches of an :class:`ImageFolderDataset` on ``device``, with :class:`DeviceLoader`'s interface.

    The order of epoch e depends only on (seed, e), as do the crops and flips; ``epoch(e, start=k)`` skips k
    batches without decoding them. Batches are normalised float32 N×3×S×S (channels_last on CUDA). Iterate one
    epoch at a time: the workers are shared between epochs. With ``world_size`` > 1 each rank decodes only its
    slice of every global batch of ``batch_size`` samples; a sample's crop and flip do not depend on the rank.
    """

    def __init__(
        self,
        dataset: ImageFolderDataset,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        device: torch.device | str = "cpu",
        num_workers: int | None = None,
        prefetch_factor: int = 4,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last and len(dataset) >= batch_size  # as DeviceLoader: static shapes when possible
        self.seed = seed
        self.device = torch.device(device)
        # On the device once: building them per batch would copy from the host (and may synchronise) every step.
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)
        n = len(dataset)
        self._num_batches = n // batch_size if self.drop_last else -(-n // batch_size)
        if num_workers is None:
            num_workers = min(8, os.cpu_count() or 1)
        self._sampler = _EpochBatchSampler(n, batch_size, self._num_batches, shuffle, seed, rank, world_size)
        self._loader = DataLoader(
            dataset,
            batch_sampler=self._sampler,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,  # no worker start-up cost every epoch
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
        )

    def __len__(self) -> int:
        return self._num_batches

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        self._sampler.epoch, self._sampler.start = epoch, start
        cuda = self.device.type == "cuda"
        for pixels, labels, index in self._loader:
            pixels = pixels.to(self.device, non_blocking=True)
            if cuda:  # reorder the uint8 batch (4× cheaper than float); normalising keeps the layout
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            x = normalize_images(pixels, self.mean, self.std)
            yield Batch(x, labels.to(self.device, non_blocking=True), index.to(self.device, non_blocking=True))


@dataclass
class FolderSplits:
    """Train and test (``val``) splits of an image folder; the counterpart of :class:`DataSplits` for data read
    from disk. Batches come from :meth:`loader`, not from resident tensors."""

    name: str
    train: ImageFolderDataset
    test: ImageFolderDataset
    num_classes: int
    input_shape: tuple[int, ...]
    classes: list[str] = field(default_factory=list)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]

    def loader(
        self,
        split: Literal["train", "test"],
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        device: torch.device | str = "cpu",
        num_workers: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> FolderLoader:
        dataset = self.train if split == "train" else self.test
        return FolderLoader(
            dataset, batch_size, shuffle, drop_last, seed, device, num_workers,
            mean=self.mean, std=self.std, rank=rank, world_size=world_size,
        )


def load_image_folder(
    root: str | Path | None = None,
    image_size: int = 224,
    resize_size: int | None = None,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> FolderSplits:
    """``root`` holds ``train/<class>/<images>`` and ``val/<class>/<images>`` (``test/`` is accepted for ``val``);
    classes are the sorted folder names of ``train``. Defaults: ImageNet's 224-pixel crops and statistics."""
    how = "pass root= a folder with train/<class>/*.JPEG and val/<class>/*.JPEG (ImageNet layout)"
    if root is None:
        raise ValueError(f"the image_folder dataset needs a root: {how}")
    root = require_path(root, "image folder", how)
    train_dir = require_path(root / "train", "training split folder", how)
    val_dir = root / "val" if (root / "val").exists() or not (root / "test").exists() else root / "test"
    require_path(val_dir, "validation split folder", how)
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"no class folders in {train_dir}: {how}")
    unknown = sorted({p.name for p in val_dir.iterdir() if p.is_dir()} - set(classes))
    if unknown:
        raise ValueError(f"{val_dir} has classes not in {train_dir}: {', '.join(unknown[:5])}")
    class_to_index = {name: i for i, name in enumerate(classes)}
    train = ImageFolderDataset(_list_images(train_dir, class_to_index), image_size, resize_size, train=True)
    test = ImageFolderDataset(_list_images(val_dir, class_to_index), image_size, resize_size, train=False)
    return FolderSplits(root.name, train, test, len(classes), (3, image_size, image_size), classes, mean, std)
