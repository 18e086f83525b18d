"""Helpers shared by the dataset loaders: image normalisation, missing-input errors, per-epoch order."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def normalize_images(
    images: np.ndarray | Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor
) -> Tensor:
    """uint8 N×C×H×W images → float32 scaled to [0, 1], then ``(x − mean) / std`` per channel.

    Works on any device, so large datasets can ship uint8 batches (4× less traffic) and normalise on the GPU;
    there, pass ``mean``/``std`` as float32 tensors already on the device to avoid a host copy per batch. The
    result keeps the memory format (e.g. channels_last) of ``images``.
    """
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    if x.dim() != 4 or x.shape[1] != len(mean) or len(mean) != len(std):
        raise ValueError(f"expected N×{len(mean)}×H×W images, got shape {tuple(x.shape)}")
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255 - mean_t) / std_t


def require_path(path: str | Path, what: str, how_to_get: str) -> Path:
    """Return ``path`` if it exists, else raise a one-line FileNotFoundError saying what is missing and how to
    get it (users meet this error first, before any training starts, so it must say what to do)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} not found at {path}: {how_to_get}")
    return path


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> Tensor:
    """The sample order of one epoch, a function of (seed, epoch) only, so a resumed run replays it exactly.

    Shared by :class:`DeviceLoader` and :class:`FolderLoader`, so array and folder datasets shuffle alike.
    """
    if not shuffle:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)
