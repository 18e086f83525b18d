"""Multi-process training with plain PyTorch: ``torchrun`` sets the environment, we read it.

NCCL on GPUs, gloo on CPU. Every rank holds the whole (small) dataset and takes its slice of each global batch,
so a run on N processes sees exactly the batches of a 1-process run with the same ``batch_size``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed() -> bool:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1). Returns whether
    training is distributed. Idempotent."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0 writes checkpoints, metrics and plots; the others only compute."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (a no-op in one process)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_batch(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's slice of the global batch, back in global-batch order (a no-op in one process).

    The loaders give rank r rows r, r + W, r + 2W, … of each global batch, so row j of rank r is global row
    j·W + r: the gathered slices are interleaved, not concatenated. Every rank's slice must have the same shape (the
    engine requires a batch size divisible by the number of processes). No gradient flows through the gather.
    """
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts, 1).flatten(0, 1)
