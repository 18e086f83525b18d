import math

import pytest
import torch
from naive_logits import SHAPES, kl, mean, random_case, rows, softmax

from fisherkd import functional as Fn
from fisherkd.methods import create
from helpers import assert_trains


def naive_jsd(s, t, beta: float, tau: float = 1.0) -> float:
    per_sample = []
    for zs, zt in zip(rows(s), rows(t)):
        ps, pt = softmax(zs, tau), softmax(zt, tau)
        m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
        per_sample.append((1 - beta) * kl(pt, m) + beta * kl(ps, m))
    return mean(per_sample)


def naive_forward_and_reverse(s, t) -> tuple[float, float]:
    pairs = [(softmax(zs), softmax(zt)) for zs, zt in zip(rows(s), rows(t))]
    return mean([kl(pt, ps) for ps, pt in pairs]), mean([kl(ps, pt) for ps, pt in pairs])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("beta", "tau"), [(0.5, 1.0), (0.1, 2.0), (0.9, 1.0)])
def test_jsd_matches_naive_loop(shape, beta, tau):
    s, t, _ = random_case(shape, seed=shape[1])
    assert math.isclose(Fn.jsd(s, t, beta, tau).item(), naive_jsd(s, t, beta, tau), rel_tol=1e-9, abs_tol=1e-12)


def test_jsd_ends_are_forward_and_reverse_kl_and_it_is_continuous_there():
    s, t, _ = random_case((6, 10), seed=1)
    forward, reverse = naive_forward_and_reverse(s, t)
    assert math.isclose(Fn.jsd(s, t, beta=0.0).item(), forward, rel_tol=1e-10)
    assert math.isclose(Fn.jsd(s, t, beta=1.0).item(), reverse, rel_tol=1e-10)
    assert math.isclose(Fn.jsd(s, t, beta=1e-6).item(), forward, rel_tol=1e-3)
    assert math.isclose(Fn.jsd(s, t, beta=1 - 1e-6).item(), reverse, rel_tol=1e-3)
    # ... and the gap keeps closing as β approaches either end (no jump at the end points).
    for end, limit in [(0.0, forward), (1.0, reverse)]:
        gaps = [abs(Fn.jsd(s, t, beta=abs(end - d)).item() - limit) for d in (1e-2, 1e-4, 1e-6, 0.0)]
        assert gaps[0] > gaps[1] > gaps[2] > gaps[3] and gaps[3] < 1e-12


def test_symmetric_jsd_is_bounded_by_log2_and_symmetric():
    s, t, _ = random_case((6, 10), seed=2, scale=30.0)
    value = Fn.jsd(s, t, beta=0.5)
    assert 0.0 < value.item() < math.log(2)
    assert torch.allclose(value, Fn.jsd(t, s, beta=0.5), rtol=1e-12)


def test_jsd_rejects_beta_outside_the_unit_interval():
    s, t, _ = random_case((2, 3), seed=3)
    with pytest.raises(ValueError, match="mixture weight"):
        Fn.jsd(s, t, beta=1.5)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_gradcheck(beta):
    s, t, _ = random_case((3, 4), seed=4)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: Fn.jsd(a, t, beta, 2.0), (s,))


def test_jsd_defaults_and_training():
    h = create("jsd").hparams
    assert (h.beta, h.temperature) == (0.5, 1.0) and create("jsd").default_weight == 1.0
    assert_trains({"name": "jsd"})
