"""Generalized JSD with β as in GKD (Agarwal et al., ICLR 2024, Eq. 1) and TRL's ``generalized_jsd_loss``.

The reference below is TRL's definition written out by hand, in plain floats: for 0 < β < 1 TRL computes
M = β·p_t + (1−β)·p_s (``logsumexp([log p_s + log(1−β), log p_t + log β])``) and
β·KL(p_t ‖ M) + (1−β)·KL(p_s ‖ M) (``beta * kl_teacher + (1 - beta) * kl_student``, with ``F.kl_div(log M, log p)``
= KL(p ‖ M)); at β = 0 it switches to KL(p_t ‖ p_s), at β = 1 to KL(p_s ‖ p_t).
"""

import math

import pytest
import torch
from naive_logits import SHAPES, kl, mean, random_case, rows, softmax

from fisherkd import functional as Fn
from fisherkd.methods import MethodInputs, create
from helpers import assert_trains


def trl_generalized_jsd(s, t, beta: float, tau: float = 1.0) -> float:
    """TRL's generalized JSD, batch mean over rows, at 0 < β < 1."""
    per_sample = []
    for zs, zt in zip(rows(s), rows(t)):
        ps, pt = softmax(zs, tau), softmax(zt, tau)
        m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
        per_sample.append(beta * kl(pt, m) + (1 - beta) * kl(ps, m))
    return mean(per_sample)


def naive_forward_and_reverse(s, t) -> tuple[float, float]:
    pairs = [(softmax(zs), softmax(zt)) for zs, zt in zip(rows(s), rows(t))]
    return mean([kl(pt, ps) for ps, pt in pairs]), mean([kl(ps, pt) for ps, pt in pairs])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("beta", "tau"), [(0.5, 1.0), (0.1, 2.0), (0.9, 1.0), (0.3, 1.0)])
def test_jsd_is_trl_generalized_jsd(shape, beta, tau):
    s, t, _ = random_case(shape, seed=shape[1])
    ours = Fn.jsd(s, t, beta, tau).item()
    assert math.isclose(ours, trl_generalized_jsd(s, t, beta, tau), rel_tol=1e-9, abs_tol=1e-12)


def test_beta_weighs_the_teacher_side_as_in_trl():
    # At β = 0.1 the student-side KL(p_s ‖ M) carries weight 0.9: swapping the weights (the convention this
    # function had before) gives a clearly different number on the same inputs.
    s, t, _ = random_case((6, 10), seed=7)
    swapped = []
    for zs, zt in zip(rows(s), rows(t)):
        ps, pt = softmax(zs), softmax(zt)
        m = [0.1 * a + 0.9 * b for a, b in zip(pt, ps)]
        swapped.append(0.9 * kl(pt, m) + 0.1 * kl(ps, m))
    ours = Fn.jsd(s, t, beta=0.1).item()
    assert math.isclose(ours, trl_generalized_jsd(s, t, 0.1), rel_tol=1e-10)
    assert abs(ours - mean(swapped)) > 0.1 * ours


def test_the_two_limits_are_forward_and_reverse_kl_scaled_by_the_vanishing_weight():
    # GKD: near β = 0 the loss is β·KL(p_t ‖ p_s) + O(β²) (forward), near β = 1 it is (1−β)·KL(p_s ‖ p_t) + O((1−β)²)
    # (reverse). The value goes continuously to 0 at both ends; the first-order coefficient is the KL.
    s, t, _ = random_case((6, 10), seed=1)
    forward, reverse = naive_forward_and_reverse(s, t)
    near_zero = [Fn.jsd(s, t, beta=d).item() / d for d in (1e-2, 1e-4, 1e-6)]
    near_one = [Fn.jsd(s, t, beta=1 - d).item() / d for d in (1e-2, 1e-4, 1e-6)]
    for ratios, limit in ((near_zero, forward), (near_one, reverse)):
        gaps = [abs(r - limit) for r in ratios]
        assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3 * limit, (ratios, limit)
    # the gradient direction tends to that of the KL: cos → 1
    s.requires_grad_(True)
    for beta, kl_loss in ((1e-5, lambda: Fn.kd(s, t, 1.0)), (1 - 1e-5, lambda: Fn.reverse_kl(s, t, 1.0))):
        (g_jsd,) = torch.autograd.grad(Fn.jsd(s, t, beta), s)
        (g_kl,) = torch.autograd.grad(kl_loss(), s)
        assert torch.nn.functional.cosine_similarity(g_jsd.flatten(), g_kl.flatten(), dim=0) > 1 - 1e-4


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.1, 1.5])
def test_beta_must_lie_strictly_inside_the_unit_interval(beta):
    s, t, _ = random_case((2, 3), seed=3)
    with pytest.raises(ValueError, match=r"0 < beta < 1 .*'kd'.*'reverse_kl'"):
        Fn.jsd(s, t, beta=beta)
    with pytest.raises(TypeError, match=r"'jsd', hyper-parameter 'beta'.*forward KL"):
        create("jsd", beta=beta)


def test_symmetric_jsd_is_bounded_by_log2_and_symmetric():
    s, t, _ = random_case((6, 10), seed=2, scale=30.0)
    value = Fn.jsd(s, t, beta=0.5)
    assert 0.0 < value.item() < math.log(2)
    assert torch.allclose(value, Fn.jsd(t, s, beta=0.5), rtol=1e-12)


@pytest.mark.parametrize("beta", [1e-3, 0.3, 1 - 1e-3])
def test_jsd_gradcheck(beta):
    s, t, _ = random_case((3, 4), seed=4)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: Fn.jsd(a, t, beta, 2.0), (s,))


def test_jsd_method_is_the_functional():
    s, t, y = random_case((5, 7), seed=6)
    out = create("jsd", beta=0.2, temperature=2.0)(MethodInputs(s, t, y))
    assert math.isclose(out["jsd"].item(), trl_generalized_jsd(s, t, 0.2, 2.0), rel_tol=1e-9)


def test_jsd_defaults_and_training():
    h = create("jsd").hparams
    assert (h.beta, h.temperature) == (0.5, 1.0) and create("jsd").default_weight == 1.0
    assert_trains({"name": "jsd"})
