import math

import pytest
import torch
from naive_logits import SHAPES, kl, mean, random_case, rows, softmax

from fisherkd import functional as Fn
from fisherkd.methods import create
from helpers import assert_trains


def naive_reverse_kl(s, t, tau: float) -> float:
    return tau * tau * mean([kl(softmax(zs, tau), softmax(zt, tau)) for zs, zt in zip(rows(s), rows(t))])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_reverse_kl_matches_naive_loop(shape, tau):
    s, t, _ = random_case(shape, seed=shape[1])
    assert math.isclose(Fn.reverse_kl(s, t, tau).item(), naive_reverse_kl(s, t, tau), rel_tol=1e-9, abs_tol=1e-12)


def test_reverse_kl_is_kd_with_the_roles_swapped():
    s, t, _ = random_case((5, 6), seed=1)
    assert torch.allclose(Fn.reverse_kl(s, t, 3.0), Fn.kd(t, s, 3.0), rtol=1e-12)


def test_reverse_kl_gradcheck():
    s, t, _ = random_case((3, 4), seed=2)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: Fn.reverse_kl(a, t, 2.0), (s,))


def test_reverse_kl_defaults_and_training():
    assert create("reverse_kl").hparams.temperature == 1.0 and create("reverse_kl").default_weight == 1.0
    assert_trains({"name": "reverse_kl"})
