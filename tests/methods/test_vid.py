import math

import pytest
import torch

from fisherkd import functional as Fn
from fisherkd.methods import MethodInputs, create
from helpers import assert_trains


def naive_vid(mean, variance, t, channel_weight=None, sample_weight=None):
    total = 0.0
    for b in range(t.shape[0]):
        mu, tb = mean[b].reshape(t.shape[1], -1).tolist(), t[b].reshape(t.shape[1], -1).tolist()
        acc, count = 0.0, 0
        for c in range(len(tb)):
            v = float(variance[c])
            w = 1.0 if channel_weight is None else float(channel_weight[c])
            for m, z in zip(mu[c], tb[c]):
                acc += w * 0.5 * ((z - m) ** 2 / v + math.log(v))
                count += 1
        total += (1.0 if sample_weight is None else float(sample_weight[b])) * acc / count
    return total / t.shape[0]


@pytest.mark.parametrize("shape", [(2, 3, 2, 2), (4, 5)])
def test_vid_matches_naive_loop(shape):
    mean, t = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    var = torch.rand(shape[1], dtype=torch.float64) + 0.1
    cw, sw = torch.rand(shape[1], dtype=torch.float64) + 0.5, torch.rand(shape[0], dtype=torch.float64) + 0.5
    assert math.isclose(Fn.vid(mean, var, t).item(), naive_vid(mean, var, t), rel_tol=1e-9)
    value = Fn.vid(mean, var, t, channel_weight=cw, sample_weight=sw).item()
    assert math.isclose(value, naive_vid(mean, var, t, cw, sw), rel_tol=1e-9)
    ones = Fn.vid(mean, var, t, channel_weight=torch.ones(shape[1]), sample_weight=torch.ones(shape[0]))
    assert ones.item() == Fn.vid(mean, var, t).item()


def test_vid_gradcheck_and_bfloat16():
    mean = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    var = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    t = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda m, v: Fn.vid(m, v, t), (mean, var))
    mean, t, var = torch.randn(8, 16, 4, 4), torch.randn(8, 16, 4, 4), torch.rand(16) + 0.5
    low, high = Fn.vid(mean.bfloat16(), var.bfloat16(), t.bfloat16()), Fn.vid(mean, var, t)
    assert torch.isfinite(low) and abs(low.item() - high.item()) < 0.02 * abs(high.item())


def test_vid_builds_from_shapes_with_initial_variance_and_checks_channels():
    method = create("vid")
    features = [torch.randn(2, 3, 4, 4), torch.randn(2, 2)], [torch.randn(2, 5, 4, 4), torch.randn(2, 4)]
    inputs = MethodInputs(torch.zeros(2, 3), student_features=features[0], teacher_features=features[1])
    with pytest.raises(RuntimeError, match="example_input="):
        method(inputs)
    method.setup(*features)
    assert [(r[0].in_channels, r[-1].out_channels) for r in method.regressors] == [(3, 5), (2, 4)]
    for logits in method.variance_logits:
        assert torch.allclose(torch.nn.functional.softplus(logits) + 1e-5, torch.tensor(5.0))
    out = method(inputs)
    assert out["vid"].shape == () and torch.isfinite(out["vid"])
    with pytest.raises(ValueError, match=r"student features have \[5, 4\] channels"):
        method(MethodInputs(torch.zeros(2, 3), student_features=features[1], teacher_features=features[1]))


def test_vid_trains():
    assert_trains({"name": "vid", "pairs": [["block2", "block2"]]})
