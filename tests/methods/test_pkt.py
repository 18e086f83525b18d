import math

import pytest
import torch

from fisherkd import functional as Fn
from fisherkd.methods import create
from helpers import assert_trains


def naive_pkt(s, t, eps=1e-7, sample_weight=None):
    def probabilities(x):
        rows = [x[b].flatten().tolist() for b in range(x.shape[0])]
        rows = [[v / (math.sqrt(sum(u * u for u in r)) + eps) for v in r] for r in rows]
        kernel = [[(sum(u * v for u, v in zip(a, z)) + 1) / 2 for z in rows] for a in rows]
        return [[k / sum(row) for k in row] for row in kernel]

    ps, pt = probabilities(s), probabilities(t)
    n = len(ps)
    total = 0.0
    for i in range(n):
        w = 1.0 if sample_weight is None else float(sample_weight[i])
        for j in range(n):
            total += w * pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps))
    return total / n**2


@pytest.mark.parametrize(("s_shape", "t_shape"), [((4, 3), (4, 7)), ((5, 2, 3, 3), (5, 4, 2, 2)), ((3, 10), (3, 2))])
def test_pkt_matches_naive_loop(s_shape, t_shape):
    s, t = torch.randn(s_shape, dtype=torch.float64), torch.randn(t_shape, dtype=torch.float64)
    sw = torch.rand(s_shape[0], dtype=torch.float64) + 0.5
    assert math.isclose(Fn.pkt(s, t).item(), naive_pkt(s, t), rel_tol=1e-9)
    assert math.isclose(Fn.pkt(s, t, sample_weight=sw).item(), naive_pkt(s, t, sample_weight=sw), rel_tol=1e-9)
    assert Fn.pkt(s, t, sample_weight=torch.ones(s_shape[0])).item() == Fn.pkt(s, t).item()


def test_pkt_is_zero_for_equal_relations():
    s = torch.randn(5, 4, dtype=torch.float64)
    assert abs(Fn.pkt(s, 3.0 * s).item()) < 1e-12


def test_pkt_gradcheck_and_bfloat16():
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: Fn.pkt(a, t), (s,))
    s, t = torch.randn(16, 64), torch.randn(16, 128)
    low, high = Fn.pkt(s.bfloat16(), t.bfloat16()), Fn.pkt(s, t)
    assert torch.isfinite(low) and abs(low.item() - high.item()) < 0.1 * high.item()


def test_pkt_defaults_and_training():
    assert create("pkt").default_weight == 30000.0
    assert_trains({"name": "pkt", "pairs": [["block2", "block2"]]})
