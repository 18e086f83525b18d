import math

import torch

from fisherkd import functional as Fn
from fisherkd.methods import create
from helpers import assert_trains


def naive_kd(s: torch.Tensor, t: torch.Tensor, tau: float) -> float:
    total = 0.0
    for n in range(s.shape[0]):
        zs = [v / tau for v in s[n].tolist()]
        zt = [v / tau for v in t[n].tolist()]
        ls = math.log(sum(math.exp(v) for v in zs))
        lt = math.log(sum(math.exp(v) for v in zt))
        for c in range(len(zs)):
            pt = math.exp(zt[c] - lt)
            total += pt * ((zt[c] - lt) - (zs[c] - ls))
    return tau * tau * total / s.shape[0]


def test_kd_matches_naive_loop():
    for shape, tau in [((4, 3), 1.0), ((7, 10), 4.0), ((2, 100), 2.5)]:
        s, t = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64) * 3
        assert math.isclose(Fn.kd(s, t, tau).item(), naive_kd(s, t, tau), rel_tol=1e-9, abs_tol=1e-12)


def test_kd_is_zero_for_equal_logits_and_shift_invariant():
    s = torch.randn(5, 6, dtype=torch.float64)
    assert Fn.kd(s, s.clone()).abs().item() < 1e-12
    t = torch.randn(5, 6, dtype=torch.float64)
    assert torch.allclose(Fn.kd(s + 7.0, t - 3.0), Fn.kd(s, t))


def test_kd_gradcheck():
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: Fn.kd(a, t, 2.0), (s,))


def test_kd_bfloat16_is_finite_and_close():
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    low = Fn.kd(s.bfloat16(), t.bfloat16())
    assert torch.isfinite(low) and abs(low.item() - Fn.kd(s, t).item()) < 0.05 * Fn.kd(s, t).item() + 1e-3


def test_kd_class_defaults_and_training():
    assert create("kd").hparams.temperature == 4.0
    assert_trains({"name": "kd"})
