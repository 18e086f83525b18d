"""Shared test utilities: tiny teacher/student models and an end-to-end 'trains a few steps' check."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from fisherkd.distiller import Distiller


class TinyCNN(nn.Module):
    """Two conv blocks (tap names ``block1``, ``block2``: B×C×H×W maps), pooled, then ``head``."""

    def __init__(self, width: int = 8, in_channels: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.block2(self.block1(x))))


def tiny_image_batch(n: int = 16, num_classes: int = 5, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, num_classes, (n,), generator=g)


def assert_trains(
    spec: dict[str, Any],
    student: nn.Module | None = None,
    teacher: nn.Module | None = None,
    inputs: Tensor | None = None,
    target: Tensor | None = None,
    steps: int = 30,
    lr: float = 1e-2,
) -> list[float]:
    """Train ``spec`` (one method, unit weight unless given) for a few Adam steps on one fixed batch.

    Asserts every loss is finite and that the last loss is below the first; returns the losses.
    """
    torch.manual_seed(0)
    student = student or TinyCNN(width=4)
    teacher = teacher or TinyCNN(width=8)
    if inputs is None:
        inputs, target = tiny_image_batch()
    spec = {"weight": 1.0, **spec}
    distiller = Distiller(student, teacher, [spec], example_input=inputs[:2])
    optimizer = torch.optim.Adam(distiller.trainable_parameters(), lr=lr)
    distiller.clock.configure(steps_per_epoch=steps)  # the loop is one epoch
    losses = []
    for _ in range(steps):
        out = distiller(inputs, target)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        distiller.after_optimizer_step()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), f"{spec['name']}: non-finite loss {losses}"
    assert losses[-1] < losses[0], f"{spec['name']}: loss did not decrease: {losses[0]:.4g} -> {losses[-1]:.4g}"
    distiller.close()
    return losses


# Every way a tensor's value reaches the host (each one a device sync on a GPU).
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


def forbid_host_reads(monkeypatch: pytest.MonkeyPatch, where: str = "the training step") -> None:
    """Make any host read of a tensor fail until ``monkeypatch.undo()``."""

    def read(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"host sync in {where}")

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, read)


def free_port() -> int:
    """A free TCP port on localhost, for a gloo rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_llama(layers: int, seed: int, vocab: int = 50, **overrides: Any) -> nn.Module:
    """A randomly initialised LlamaForCausalLM (hidden 16, 2 heads sharing 1 KV head), seeded."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        **overrides,
    )
    return transformers.LlamaForCausalLM(config)
