import math

import pytest
import torch
from naive_logits import random_case, rows, softmax

from fisherkd import functional as Fn
from fisherkd.methods import create
from helpers import assert_trains


def naive_sinkhorn(s, t, tau: float, eps: float, iterations: int) -> float:
    """The reference algorithm on plain floats: kernel exp(−M/ε), alternate row and column normalization."""
    ps = [softmax(z, tau) for z in rows(s)]
    pt = [softmax(z, tau) for z in rows(t)]
    n = len(ps)
    cost = [[sum(abs(a - b) for a, b in zip(ps[i], pt[j])) for j in range(n)] for i in range(n)]
    plan = [[math.exp(-cost[i][j] / eps) for j in range(n)] for i in range(n)]
    for _ in range(iterations):
        plan = [[v / sum(row) for v in row] for row in plan]
        col_sums = [sum(plan[i][j] for i in range(n)) for j in range(n)]
        plan = [[plan[i][j] / col_sums[j] for j in range(n)] for i in range(n)]
    return sum(plan[i][j] * cost[i][j] for i in range(n) for j in range(n)) / n


@pytest.mark.parametrize("shape", [(4, 3), (7, 10), (2, 50), (1, 5)])
@pytest.mark.parametrize(("tau", "eps", "iterations"), [(2.0, 0.1, 20), (1.0, 0.5, 3), (4.0, 0.05, 1)])
def test_sinkhorn_matches_naive_loop(shape, tau, eps, iterations):
    s, t, _ = random_case(shape, seed=shape[1])
    expected = naive_sinkhorn(s, t, tau, eps, iterations)
    assert math.isclose(Fn.sinkhorn(s, t, tau, eps, iterations).item(), expected, rel_tol=1e-9, abs_tol=1e-12)


def test_sinkhorn_is_a_batch_mean():
    # Repeating the batch repeats every block of the plan, so the mean transport cost is unchanged.
    s, t, _ = random_case((5, 6), seed=1)
    doubled = Fn.sinkhorn(torch.cat([s, s]), torch.cat([t, t]))
    assert torch.allclose(doubled, Fn.sinkhorn(s, t), rtol=1e-9)


def test_sinkhorn_survives_a_tiny_epsilon():
    # exp(−M/ε) underflows to 0 for ε=1e-3 in float32; the log-space scaling does not need it.
    s, t, _ = random_case((6, 10), seed=2, scale=10.0)
    s = s.float().requires_grad_(True)
    value = Fn.sinkhorn(s, t.float(), epsilon=1e-3)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()


def test_sinkhorn_gradcheck():
    s, t, _ = random_case((3, 4), seed=3)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: Fn.sinkhorn(a, t, 1.0, 0.5, 5), (s,))


def test_sinkhorn_defaults_and_training():
    h = create("sinkhorn").hparams
    assert (h.temperature, h.epsilon, h.iterations) == (2.0, 0.1, 20)
    assert_trains({"name": "sinkhorn"})
