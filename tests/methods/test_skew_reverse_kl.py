import math

import pytest
import torch
from naive_logits import SHAPES, kl, mean, random_case, rows, softmax

from fisherkd import functional as Fn
from fisherkd.methods import create
from helpers import assert_trains


def naive_skew_reverse_kl(s, t, alpha: float, tau: float) -> float:
    per_sample = []
    for zs, zt in zip(rows(s), rows(t)):
        ps, pt = softmax(zs, tau), softmax(zt, tau)
        per_sample.append(kl(ps, [alpha * a + (1 - alpha) * b for a, b in zip(ps, pt)]))
    return mean(per_sample)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("alpha", "tau"), [(0.1, 1.0), (0.5, 2.0), (0.9, 1.0)])
def test_skew_reverse_kl_matches_naive_loop(shape, alpha, tau):
    s, t, _ = random_case(shape, seed=shape[1])
    expected = naive_skew_reverse_kl(s, t, alpha, tau)
    assert math.isclose(Fn.skew_reverse_kl(s, t, alpha, tau).item(), expected, rel_tol=1e-9, abs_tol=1e-12)


def test_skew_reverse_kl_ends_and_bound():
    s, t, _ = random_case((6, 10), seed=1, scale=40.0)
    assert torch.allclose(Fn.skew_reverse_kl(s, t, alpha=0.0), Fn.reverse_kl(s, t, 1.0), rtol=1e-12)
    assert Fn.skew_reverse_kl(s, t, alpha=1.0).item() == 0.0
    # The mixture keeps at least α of the first distribution, so the divergence is at most log(1/α).
    assert 0.0 < Fn.skew_reverse_kl(s, t, alpha=0.1).item() <= math.log(10.0)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.7])
def test_skew_reverse_kl_gradcheck(alpha):
    s, t, _ = random_case((3, 4), seed=2)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: Fn.skew_reverse_kl(a, t, alpha, 2.0), (s,))


def test_skew_reverse_kl_defaults_and_training():
    h = create("skew_reverse_kl").hparams
    assert (h.alpha, h.temperature) == (0.1, 1.0) and create("skew_reverse_kl").default_weight == 1.0
    assert_trains({"name": "skew_reverse_kl"})
