import math

import pytest
import torch
from naive_logits import SHAPES, labels, mean, random_case, rows, softmax

from fisherkd import functional as Fn
from fisherkd.methods import create
from helpers import assert_trains


def naive_parts(zs: list[float], zt: list[float], y: int, tau: float) -> tuple[float, float]:
    """(target term, non-target cross-entropy without γλ²) for one sample, straight from the paper."""
    target = -softmax(zt)[y] * math.log(softmax(zs)[y])
    qs = softmax([v for c, v in enumerate(zs) if c != y], tau)
    qt = softmax([v for c, v in enumerate(zt) if c != y], tau)
    return target, -sum(a * math.log(b) for a, b in zip(qt, qs))


def naive_nkd(s, t, y, tau: float, gamma: float) -> float:
    per_sample = []
    for zs, zt, c in zip(rows(s), rows(t), labels(y)):
        target, non_target = naive_parts(zs, zt, c, tau)
        per_sample.append(target + gamma * tau * tau * non_target)
    return mean(per_sample)


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[1] > 2])
@pytest.mark.parametrize(("tau", "gamma"), [(1.0, 1.5), (2.0, 1.0), (4.0, 0.5)])
def test_nkd_matches_naive_loop(shape, tau, gamma):
    s, t, y = random_case(shape, seed=shape[0] + shape[1])
    assert math.isclose(Fn.nkd(s, t, y, tau, gamma).item(), naive_nkd(s, t, y, tau, gamma), rel_tol=1e-9)


def _non_target_term(s, t, y):
    return Fn.nkd(s, t, y, gamma=1.0) - Fn.nkd(s, t, y, gamma=0.0)


@pytest.mark.parametrize("shift", [3.0, -50.0, 1e4])
def test_the_target_logit_never_enters_the_non_target_term(shift):
    s, t, y = random_case((6, 8), seed=1)
    moved_s, moved_t = s.clone(), t.clone()
    moved_s[torch.arange(6), y] += shift
    moved_t[torch.arange(6), y] += shift
    # Only the target term may change, however large the target logits become.
    assert torch.allclose(_non_target_term(moved_s, moved_t, y), _non_target_term(s, t, y), rtol=1e-10)
    assert not torch.allclose(Fn.nkd(moved_s, t, y, gamma=0.0), Fn.nkd(s, t, y, gamma=0.0))


def test_nkd_gradcheck():
    s, t, y = random_case((3, 5), seed=2)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: Fn.nkd(a, t, y, 2.0, 1.5), (s,))


def test_nkd_defaults_and_training():
    method = create("nkd")
    assert (method.hparams.temperature, method.hparams.gamma) == (1.0, 1.5)
    assert method.default_weight == 1.0 and method.needs_target
    assert_trains({"name": "nkd"})
