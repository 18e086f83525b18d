import math

import pytest
import torch
from naive_logits import SHAPES, entropy, labels, mean, random_case, rows, softmax

from fisherkd import functional as Fn
from fisherkd.methods import create
from helpers import assert_trains


def naive_ofa(s, t, y, eps: float, tau: float) -> float:
    per_sample = []
    for zs, zt, label in zip(rows(s), rows(t), labels(y)):
        ps, pt = softmax(zs, tau), softmax(zt, tau)
        total = 0.0
        for c in range(len(ps)):
            hot = 1.0 if c == label else 0.0
            total -= ((pt[c] + hot) ** eps - hot) * math.log(ps[c])
        per_sample.append(total)
    return mean(per_sample)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("eps", "tau"), [(1.0, 1.0), (1.5, 1.0), (2.0, 3.0)])
def test_ofa_matches_naive_loop(shape, eps, tau):
    s, t, y = random_case(shape, seed=shape[1])
    assert math.isclose(Fn.ofa(s, t, y, eps, tau).item(), naive_ofa(s, t, y, eps, tau), rel_tol=1e-9)


def test_ofa_with_eps_one_is_soft_cross_entropy():
    """−Σ p_t·log p_s = KL(p_t ‖ p_s) + H(p_t), whatever the label."""
    s, t, y = random_case((6, 9), seed=1)
    teacher_entropy = mean([entropy(softmax(z)) for z in rows(t)])
    expected = Fn.kd(s, t, 1.0).item() + teacher_entropy
    assert math.isclose(Fn.ofa(s, t, y, eps=1.0).item(), expected, rel_tol=1e-10)
    assert math.isclose(Fn.ofa(s, t, (y + 1) % 9, eps=1.0).item(), expected, rel_tol=1e-10)


def test_ofa_gradcheck():
    s, t, y = random_case((3, 4), seed=2)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: Fn.ofa(a, t, y, 1.5, 2.0), (s,))


def test_ofa_defaults_and_training():
    method = create("ofa")
    assert (method.hparams.eps, method.hparams.temperature) == (1.0, 1.0)
    assert method.default_weight == 1.0 and method.needs_target
    assert_trains({"name": "ofa"})
    assert_trains({"name": "ofa", "eps": 1.5})
