"""Slow, obviously correct building blocks for the logit-family tests: Python loops over plain floats.

Nothing here calls fisherkd, so a test comparing a loss with a reference built from these checks the
vectorised code independently.
"""

from __future__ import annotations

import math

import torch


def rows(x: torch.Tensor) -> list[list[float]]:
    return x.double().tolist()


def labels(y: torch.Tensor) -> list[int]:
    return [int(v) for v in y.tolist()]


def softmax(z: list[float], tau: float = 1.0) -> list[float]:
    top = max(z)
    e = [math.exp((v - top) / tau) for v in z]
    total = sum(e)
    return [v / total for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def entropy(p: list[float]) -> float:
    return -sum(pi * math.log(pi) for pi in p if pi > 0)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def pearson(a: list[float], b: list[float], eps: float = 1e-8) -> float:
    ma, mb = mean(a), mean(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    na = math.sqrt(sum((x - ma) ** 2 for x in a))
    nb = math.sqrt(sum((y - mb) ** 2 for y in b))
    return num / (na * nb + eps)


def column(matrix: list[list[float]], j: int) -> list[float]:
    return [row[j] for row in matrix]


def random_case(
    shape: tuple[int, int], seed: int, scale: float = 3.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 student logits, teacher logits (sharper) and labels."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, shape[1], (shape[0],), generator=g)
    return s, t, y


SHAPES = [(4, 3), (7, 10), (2, 50), (1, 5)]
