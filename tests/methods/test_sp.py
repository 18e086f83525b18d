import math

import pytest
import torch

from fisherkd import functional as Fn
from fisherkd.methods import create
from helpers import assert_trains


def naive_sp(s, t):
    def normalised_gram(x):
        rows = [x[b].flatten().tolist() for b in range(x.shape[0])]
        gram = [[sum(u * v for u, v in zip(a, z)) for z in rows] for a in rows]
        return [[g / math.sqrt(sum(v * v for v in row)) for g in row] for row in gram]

    gs, gt = normalised_gram(s), normalised_gram(t)
    n = len(gs)
    return sum((gs[i][j] - gt[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2


@pytest.mark.parametrize(("s_shape", "t_shape"), [((4, 3), (4, 7)), ((5, 2, 3, 3), (5, 4, 2, 2)), ((2, 6), (2, 6))])
def test_sp_matches_naive_loop(s_shape, t_shape):
    s, t = torch.randn(s_shape, dtype=torch.float64), torch.randn(t_shape, dtype=torch.float64)
    assert math.isclose(Fn.sp(s, t).item(), naive_sp(s, t), rel_tol=1e-9)


def test_sp_is_invariant_to_feature_scale():
    s, t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 9, dtype=torch.float64)
    assert torch.allclose(Fn.sp(7.0 * s, 0.1 * t), Fn.sp(s, t), rtol=1e-12)


def test_sp_gradcheck_and_bfloat16():
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: Fn.sp(a, t), (s,))
    s, t = torch.randn(16, 64), torch.randn(16, 128)
    low, high = Fn.sp(s.bfloat16(), t.bfloat16()), Fn.sp(s, t)
    assert torch.isfinite(low) and abs(low.item() - high.item()) < 0.05 * high.item()


def test_sp_defaults_and_training():
    assert create("sp").default_weight == 3000.0
    assert_trains({"name": "sp", "pairs": [["block2", "block2"]]})
