import math

import pytest
import torch
from naive_logits import SHAPES, kl, labels, mean, random_case, rows, softmax

from fisherkd import functional as Fn
from fisherkd.methods import MethodInputs, create
from helpers import assert_trains


def naive_tckd_nckd(zs: list[float], zt: list[float], y: int, tau: float) -> tuple[float, float]:
    ps, pt = softmax(zs, tau), softmax(zt, tau)
    tckd = kl([pt[y], 1.0 - pt[y]], [ps[y], 1.0 - ps[y]])
    others_s = [v for c, v in enumerate(zs) if c != y]
    others_t = [v for c, v in enumerate(zt) if c != y]
    nckd = kl(softmax(others_t, tau), softmax(others_s, tau))
    return tckd, nckd


def naive_dkd(s, t, y, alpha: float, beta: float, tau: float) -> float:
    per_sample = []
    for zs, zt, c in zip(rows(s), rows(t), labels(y)):
        tckd, nckd = naive_tckd_nckd(zs, zt, c, tau)
        per_sample.append(alpha * tckd + beta * nckd)
    return tau * tau * mean(per_sample)


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[1] > 2])
@pytest.mark.parametrize(("alpha", "beta", "tau"), [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (1.0, 0.0, 2.0)])
def test_dkd_matches_naive_loop(shape, alpha, beta, tau):
    s, t, y = random_case(shape, seed=shape[1])
    got = Fn.dkd(s, t, y, alpha, beta, tau).item()
    assert math.isclose(got, naive_dkd(s, t, y, alpha, beta, tau), rel_tol=1e-9, abs_tol=1e-12)


def test_kd_is_tckd_plus_coupled_nckd():
    """The DKD paper's decomposition, per sample and without τ²: KL(p_t‖p_s) = TCKD + (1 − p_t,y)·NCKD."""
    s, t, y = random_case((6, 9), seed=3)
    tau = 4.0
    for n in range(6):
        row_s, row_t, row_y = s[n : n + 1], t[n : n + 1], y[n : n + 1]
        kd = Fn.kd(row_s, row_t, tau) / tau**2
        tckd = Fn.dkd(row_s, row_t, row_y, alpha=1.0, beta=0.0, temperature=tau) / tau**2
        nckd = Fn.dkd(row_s, row_t, row_y, alpha=0.0, beta=1.0, temperature=tau) / tau**2
        p_target = torch.softmax(row_t / tau, -1)[0, row_y[0]]
        assert torch.allclose(kd, tckd + (1 - p_target) * nckd, rtol=1e-10, atol=1e-14)


def test_nckd_ignores_the_target_logit():
    s, t, y = random_case((5, 7), seed=4)
    moved_s, moved_t = s.clone(), t.clone()
    moved_s[torch.arange(5), y] += 30.0
    moved_t[torch.arange(5), y] -= 30.0
    assert torch.allclose(Fn.dkd(s, t, y, 0.0, 1.0), Fn.dkd(moved_s, moved_t, y, 0.0, 1.0), rtol=1e-10)


def test_dkd_is_stable_for_a_confident_teacher():
    # p_y ≈ 1 makes 1 − p_y cancel catastrophically if computed from probabilities; it is a log-sum-exp here.
    s, t, y = random_case((4, 6), seed=5)
    t[torch.arange(4), y] += 200.0
    value = Fn.dkd(s.float(), t.float(), y)
    assert torch.isfinite(value)


def test_dkd_gradcheck():
    s, t, y = random_case((3, 5), seed=6)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: Fn.dkd(a, t, y, 1.0, 8.0, 2.0), (s,))


@pytest.mark.parametrize("epoch", [0.0, 5.0, 10, 19.5, 20.0, 45.0, torch.tensor(7.0), torch.tensor(30)])
def test_dkd_warmup_is_linear_over_20_epochs(epoch):
    s, t, y = random_case((5, 6), seed=7)
    method = create("dkd")
    got = method(MethodInputs(s, t, y, epoch=epoch))["dkd"]
    factor = min(float(epoch) / 20.0, 1.0)
    assert torch.allclose(got, factor * Fn.dkd(s, t, y), rtol=1e-12, atol=0.0)
    assert create("dkd", warmup_epochs=0)(MethodInputs(s, t, y, epoch=epoch))["dkd"].item() == Fn.dkd(s, t, y).item()


def test_dkd_defaults_and_training():
    h = create("dkd").hparams
    assert (h.alpha, h.beta, h.temperature, h.warmup_epochs, h.standardize) == (1.0, 8.0, 4.0, 20.0, False)
    assert create("dkd").default_weight == 1.0 and create("dkd").needs_target
    assert_trains({"name": "dkd", "warmup_epochs": 0})
