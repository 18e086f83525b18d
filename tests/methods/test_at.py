import math

import pytest
import torch

from fisherkd import functional as Fn
from fisherkd.methods import create
from helpers import assert_trains


def naive_attention(f, p, weight=None):
    b_maps = []
    for b in range(f.shape[0]):
        channels = f[b].reshape(f.shape[1], -1).tolist()
        q = []
        for j in range(len(channels[0])):
            terms = [
                (1.0 if weight is None else float(weight[c])) * abs(channels[c][j]) ** p for c in range(len(channels))
            ]
            q.append(sum(terms) / len(terms))
        norm = math.sqrt(sum(v * v for v in q))
        b_maps.append([v / norm for v in q])
    return b_maps


def naive_at(s, t, p=2.0, channel_weight=None, sample_weight=None):
    qs, qt = naive_attention(s, p), naive_attention(t, p, channel_weight)
    total = 0.0
    for b in range(len(qs)):
        per = sum((a - z) ** 2 for a, z in zip(qs[b], qt[b])) / len(qs[b])
        total += (1.0 if sample_weight is None else float(sample_weight[b])) * per
    return total / len(qs)


@pytest.mark.parametrize(
    ("s_shape", "t_shape", "p"), [((2, 3, 4, 4), (2, 5, 4, 4), 2.0), ((3, 2, 3, 5), (3, 6, 3, 5), 3.0)]
)
def test_at_matches_naive_loop(s_shape, t_shape, p):
    s, t = torch.randn(s_shape, dtype=torch.float64), torch.randn(t_shape, dtype=torch.float64)
    cw, sw = torch.rand(t_shape[1], dtype=torch.float64) + 0.5, torch.rand(s_shape[0], dtype=torch.float64) + 0.5
    assert math.isclose(Fn.at(s, t, p).item(), naive_at(s, t, p), rel_tol=1e-9)
    value = Fn.at(s, t, p, channel_weight=cw, sample_weight=sw).item()
    assert math.isclose(value, naive_at(s, t, p, cw, sw), rel_tol=1e-9)


def test_at_is_invariant_to_feature_scale_and_exact_with_unit_weights():
    s, t = torch.randn(4, 3, 5, 5, dtype=torch.float64), torch.randn(4, 7, 5, 5, dtype=torch.float64)
    assert torch.allclose(Fn.at(3.0 * s, 0.25 * t), Fn.at(s, t), rtol=1e-12)
    assert Fn.at(s, t, channel_weight=torch.ones(7), sample_weight=torch.ones(4)).item() == Fn.at(s, t).item()


def test_at_rejects_different_spatial_sizes_naming_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 3, 8, 8\)"):
        Fn.at(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8))


def test_at_gradcheck_and_bfloat16():
    s = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 2, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: Fn.at(a, t), (s,))
    s, t = torch.randn(8, 16, 6, 6), torch.randn(8, 32, 6, 6)
    low, high = Fn.at(s.bfloat16(), t.bfloat16()), Fn.at(s, t)
    assert torch.isfinite(low) and abs(low.item() - high.item()) < 0.05 * high.item()


def test_at_defaults_and_training():
    method = create("at")
    assert method.hparams.p == 2.0 and method.default_weight == 1000.0
    assert_trains({"name": "at", "pairs": [["block2", "block2"]]})
