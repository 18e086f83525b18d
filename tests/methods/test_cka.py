import math

import pytest
import torch

from fisherkd import functional as Fn
from fisherkd.methods import create
from helpers import assert_trains


def naive_cka_loss(s, t):
    # feature-space form: ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) with batch-centred columns
    def centred_columns(x):
        rows = [x[b].flatten().tolist() for b in range(x.shape[0])]
        cols = list(zip(*rows))
        return [[v - sum(c) / len(c) for v in c] for c in cols]

    def cross(a, b):
        return sum(sum(u * v for u, v in zip(ca, cb)) ** 2 for ca in a for cb in b)

    x, y = centred_columns(s), centred_columns(t)
    return 1.0 - cross(y, x) / math.sqrt(cross(x, x) * cross(y, y))


@pytest.mark.parametrize(("s_shape", "t_shape"), [((5, 3), (5, 7)), ((4, 2, 2, 2), (4, 3)), ((8, 12), (8, 2))])
def test_cka_matches_naive_loop(s_shape, t_shape):
    s, t = torch.randn(s_shape, dtype=torch.float64), torch.randn(t_shape, dtype=torch.float64)
    assert math.isclose(Fn.cka(s, t).item(), naive_cka_loss(s, t), rel_tol=1e-9)


def test_cka_is_squared_correlation_not_its_square_root():
    # centred x = (−1.5, −.5, .5, 1.5), y = (−1.5, .5, −.5, 1.5): r = 4/5, CKA = r² = 0.64, so the loss is 0.36;
    # the √CKA mistake would give 1 − 0.8 = 0.2
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=torch.float64)
    y = torch.tensor([[1.0], [3.0], [2.0], [4.0]], dtype=torch.float64)
    assert math.isclose(Fn.cka(x, y).item(), 0.36, rel_tol=1e-12)


def test_cka_identities():
    x = torch.randn(10, 6, dtype=torch.float64)
    y = torch.randn(10, 4, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    assert abs(Fn.cka(x, x.clone()).item()) < 1e-12
    assert abs(Fn.cka(x, x @ q).item()) < 1e-12  # orthogonal transform
    assert math.isclose(Fn.cka(3.5 * x @ q, y).item(), Fn.cka(x, y).item(), rel_tol=1e-10)  # + isotropic scaling
    assert math.isclose(Fn.cka(x + 5.0, y).item(), Fn.cka(x, y).item(), rel_tol=1e-10)  # centring


def test_cka_gradcheck_and_bfloat16():
    s = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: Fn.cka(a, t), (s,))
    s, t = torch.randn(32, 64), torch.randn(32, 16)
    low, high = Fn.cka(s.bfloat16(), t.bfloat16()), Fn.cka(s, t)
    assert torch.isfinite(low) and abs(low.item() - high.item()) < 0.02


def test_cka_trains():
    assert create("cka").default_weight == 1.0
    assert_trains({"name": "cka", "pairs": [["block2", "block2"]]})
