import math

import pytest
import torch
from naive_logits import SHAPES, mean, random_case, rows, softmax

from fisherkd import functional as Fn
from fisherkd.methods import create
from helpers import assert_trains


def naive_tvd(s, t, tau: float) -> float:
    per_sample = []
    for zs, zt in zip(rows(s), rows(t)):
        ps, pt = softmax(zs, tau), softmax(zt, tau)
        per_sample.append(0.5 * sum(abs(a - b) for a, b in zip(pt, ps)))
    return mean(per_sample)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_tvd_matches_naive_loop(shape, tau):
    s, t, _ = random_case(shape, seed=shape[1])
    assert math.isclose(Fn.tvd(s, t, tau).item(), naive_tvd(s, t, tau), rel_tol=1e-9, abs_tol=1e-12)


def test_tvd_is_a_symmetric_distance_in_the_unit_interval():
    s, t, _ = random_case((6, 8), seed=1, scale=50.0)
    value = Fn.tvd(s, t)
    assert 0.0 < value.item() <= 1.0
    assert torch.allclose(value, Fn.tvd(t, s), rtol=1e-12)
    assert Fn.tvd(s, s.clone()).item() == 0.0


def test_tvd_gradcheck():
    s, t, _ = random_case((3, 4), seed=2)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: Fn.tvd(a, t, 2.0), (s,))


def test_tvd_defaults_and_training():
    assert create("tvd").hparams.temperature == 1.0 and create("tvd").default_weight == 1.0
    assert_trains({"name": "tvd"})
