import math

import pytest
import torch

from fisherkd import functional as Fn
from fisherkd.methods import create
from helpers import assert_trains


def huber(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def naive_rkd(s, t, wd=25.0, wa=50.0):
    def rows(x):
        return [x[b].flatten().tolist() for b in range(x.shape[0])]

    def distances(r):
        n = len(r)
        d = [[math.dist(r[i], r[j]) for j in range(n)] for i in range(n)]
        mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[v / mean for v in row] for row in d]

    def unit(a, b):  # unit vector from b to a; the zero vector when a == b
        v = [x - y for x, y in zip(a, b)]
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v] if norm > 0 else [0.0] * len(v)

    def angles(r):
        n = len(r)
        return [
            [[sum(x * y for x, y in zip(unit(r[i], r[j]), unit(r[k], r[j]))) for k in range(n)] for i in range(n)]
            for j in range(n)
        ]

    rs, rt = rows(s), rows(t)
    n = len(rs)
    ds, dt = distances(rs), distances(rt)
    loss_d = sum(huber(ds[i][j], dt[i][j]) for i in range(n) for j in range(n)) / n**2
    a_s, a_t = angles(rs), angles(rt)
    loss_a = sum(huber(a_s[j][i][k], a_t[j][i][k]) for i in range(n) for j in range(n) for k in range(n)) / n**3
    return wd * loss_d + wa * loss_a


@pytest.mark.parametrize(("s_shape", "t_shape"), [((4, 3), (4, 7)), ((5, 2, 2, 2), (5, 7)), ((3, 6), (3, 6))])
def test_rkd_matches_naive_loop(s_shape, t_shape):
    s, t = torch.randn(s_shape, dtype=torch.float64), torch.randn(t_shape, dtype=torch.float64) * 2
    assert math.isclose(Fn.rkd(s, t).item(), naive_rkd(s, t), rel_tol=1e-9)
    assert math.isclose(Fn.rkd(s, t, 1.0, 0.0).item(), naive_rkd(s, t, 1.0, 0.0), rel_tol=1e-9)


def test_rkd_huber_branch_above_one():
    # far-apart normalised distances exercise the linear part of the Huber loss
    s = torch.tensor([[0.0], [1.0], [2.0], [100.0]], dtype=torch.float64)
    t = torch.tensor([[0.0], [10.0], [20.0], [21.0]], dtype=torch.float64)
    assert math.isclose(Fn.rkd(s, t).item(), naive_rkd(s, t), rel_tol=1e-9)


def test_rkd_is_scale_invariant_and_needs_two_samples():
    s, t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    assert torch.allclose(Fn.rkd(4.0 * s, 0.5 * t), Fn.rkd(s, t), rtol=1e-10)
    assert Fn.rkd(s, 3.0 * s).abs().item() < 1e-12
    with pytest.raises(ValueError, match="at least 2"):
        Fn.rkd(torch.randn(1, 3), torch.randn(1, 3))


def test_rkd_gradcheck_and_bfloat16():
    s = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: Fn.rkd(a, t), (s,))
    s, t = torch.randn(16, 32), torch.randn(16, 64)
    low, high = Fn.rkd(s.bfloat16(), t.bfloat16()), Fn.rkd(s, t)
    assert torch.isfinite(low) and abs(low.item() - high.item()) < 0.05 * high.item()


def test_rkd_defaults_and_training():
    method = create("rkd")
    assert (method.hparams.distance_weight, method.hparams.angle_weight) == (25.0, 50.0)
    assert_trains({"name": "rkd", "pairs": [["block2", "block2"]]})
