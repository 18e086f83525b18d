import math

import pytest
import torch
from naive_logits import column, mean, pearson, random_case, rows, softmax

from fisherkd import functional as Fn
from fisherkd.methods import create
from helpers import assert_trains


def naive_dist(s, t, beta: float, gamma: float, tau: float) -> float:
    ps = [softmax(z, tau) for z in rows(s)]
    pt = [softmax(z, tau) for z in rows(t)]
    inter = 1.0 - mean([pearson(a, b) for a, b in zip(ps, pt)])
    intra = 1.0 - mean([pearson(column(ps, c), column(pt, c)) for c in range(len(ps[0]))])
    return tau * tau * (beta * inter + gamma * intra)


@pytest.mark.parametrize("shape", [(4, 3), (7, 10), (3, 50)])
@pytest.mark.parametrize(("beta", "gamma", "tau"), [(1.0, 1.0, 4.0), (2.0, 0.5, 1.0)])
def test_dist_matches_naive_loop(shape, beta, gamma, tau):
    s, t, _ = random_case(shape, seed=sum(shape))
    assert math.isclose(Fn.dist(s, t, beta, gamma, tau).item(), naive_dist(s, t, beta, gamma, tau), rel_tol=1e-9)


def test_dist_is_invariant_to_constants_added_per_sample():
    s, t, _ = random_case((6, 9), seed=1)
    shift_s, shift_t = torch.randn(6, 1, dtype=torch.float64) * 10, torch.randn(6, 1, dtype=torch.float64) * 10
    assert torch.allclose(Fn.dist(s + shift_s, t + shift_t), Fn.dist(s, t), rtol=1e-9)


def test_dist_is_zero_for_a_perfect_student():
    s, _, _ = random_case((5, 7), seed=2)
    # Not exactly 0: the reference adds eps=1e-8 to the product of norms in the denominator.
    assert Fn.dist(s, s.clone(), temperature=1.0).abs().item() < 1e-5


def test_dist_gradcheck():
    s, t, _ = random_case((4, 5), seed=3)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: Fn.dist(a, t, 1.0, 1.0, 2.0), (s,))


def test_dist_defaults_and_training():
    h = create("dist").hparams
    assert (h.beta, h.gamma, h.temperature) == (1.0, 1.0, 4.0)
    assert create("dist").default_weight == 1.0
    assert_trains({"name": "dist"})
