import math

import pytest
import torch

from fisherkd import functional as Fn
from helpers import assert_trains


def naive_fitnet(s, t, channel_weight=None, sample_weight=None):
    # Channels on axis 1, except B×T×D tokens whose channels are last.
    total = 0.0
    for b in range(s.shape[0]):
        sb, tb = s[b], t[b]
        if s.dim() == 3:
            sb, tb = sb.T, tb.T
        sb, tb = sb.reshape(sb.shape[0], -1).tolist(), tb.reshape(tb.shape[0], -1).tolist()
        acc, count = 0.0, 0
        for c in range(len(sb)):
            w = 1.0 if channel_weight is None else float(channel_weight[c])
            for a, z in zip(sb[c], tb[c]):
                acc += w * (a - z) ** 2
                count += 1
        total += (1.0 if sample_weight is None else float(sample_weight[b])) * acc / count
    return total / s.shape[0]


@pytest.mark.parametrize("shape", [(3, 4, 2, 2), (2, 5), (2, 3, 4)])
def test_fitnet_matches_naive_loop_with_and_without_weights(shape):
    s, t = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    channels = shape[-1] if len(shape) == 3 else shape[1]
    cw, sw = torch.rand(channels, dtype=torch.float64) + 0.5, torch.rand(shape[0], dtype=torch.float64) + 0.5
    assert math.isclose(Fn.fitnet(s, t).item(), naive_fitnet(s, t), rel_tol=1e-9)
    value = Fn.fitnet(s, t, channel_weight=cw, sample_weight=sw).item()
    assert math.isclose(value, naive_fitnet(s, t, cw, sw), rel_tol=1e-9)


def test_fitnet_all_ones_weights_are_exactly_unweighted():
    s, t = torch.randn(4, 6, 3, 3), torch.randn(4, 6, 3, 3)
    weighted = Fn.fitnet(s, t, channel_weight=torch.ones(6), sample_weight=torch.ones(4))
    assert weighted.item() == Fn.fitnet(s, t).item()


def test_fitnet_rejects_mismatched_shapes_and_weights():
    with pytest.raises(ValueError, match="differ"):
        Fn.fitnet(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match="channel weights"):
        Fn.fitnet(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), channel_weight=torch.ones(5))


def test_fitnet_gradcheck_and_bfloat16():
    s = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    t, w = torch.randn(2, 3, 2, 2, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: Fn.fitnet(a, t, channel_weight=w), (s,))
    s, t = torch.randn(8, 16, 4, 4), torch.randn(8, 16, 4, 4)
    low, high = Fn.fitnet(s.bfloat16(), t.bfloat16()), Fn.fitnet(s, t)
    assert low.dtype == torch.float32 and torch.isfinite(low) and abs(low.item() - high.item()) < 0.02 * high.item()


def test_fitnet_trains():
    assert_trains({"name": "fitnet", "pairs": [["block2", "block2"]]})
