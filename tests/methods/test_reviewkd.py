import math

import pytest
import torch

from fisherkd import functional as Fn
from fisherkd.methods import MethodInputs, create
from helpers import assert_trains


def naive_pool(x, b, c, level):
    # adaptive average pooling: cell i covers rows floor(i·H/l) .. ceil((i+1)·H/l) − 1
    h, w = x.shape[-2:]
    cells = []
    for i in range(level):
        for j in range(level):
            r0, r1 = (i * h) // level, -((-(i + 1) * h) // level)
            c0, c1 = (j * w) // level, -((-(j + 1) * w) // level)
            vals = [float(x[b, c, r, q]) for r in range(r0, r1) for q in range(c0, c1)]
            cells.append(sum(vals) / len(vals))
    return cells


def naive_mse(a, z):
    return sum((u - v) ** 2 for u, v in zip(a, z)) / len(a)


def naive_hcl(students, teachers, levels=(4, 2, 1)):
    total = 0.0
    for s, t in zip(students, teachers):
        n, c, h, _ = s.shape
        full = naive_mse(s.flatten().tolist(), t.flatten().tolist())
        loss, weight, norm = full, 1.0, 1.0
        for level in levels:
            if level >= h:
                continue
            weight /= 2
            ps = [v for b in range(n) for k in range(c) for v in naive_pool(s, b, k, level)]
            pt = [v for b in range(n) for k in range(c) for v in naive_pool(t, b, k, level)]
            loss += weight * naive_mse(ps, pt)
            norm += weight
        total += loss / norm
    return total


def test_hcl_matches_naive_loop_over_stages_and_levels():
    shapes = [(2, 3, 8, 8), (2, 4, 4, 4), (2, 5, 1, 1), (2, 2, 6, 6)]
    students = [torch.randn(s, dtype=torch.float64) for s in shapes]
    teachers = [torch.randn(s, dtype=torch.float64) for s in shapes]
    assert math.isclose(Fn.hcl(students, teachers).item(), naive_hcl(students, teachers), rel_tol=1e-9)
    ones = Fn.hcl(students, teachers, sample_weight=torch.ones(2, dtype=torch.float64))
    assert ones.item() == Fn.hcl(students, teachers).item()


def test_hcl_gradcheck_and_bfloat16():
    s = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: Fn.hcl([a], [t]), (s,))
    s, t = torch.randn(8, 16, 8, 8), torch.randn(8, 16, 8, 8)
    low, high = Fn.hcl([s.bfloat16()], [t.bfloat16()]), Fn.hcl([s], [t])
    assert torch.isfinite(low) and abs(low.item() - high.item()) < 0.02 * high.item()


def review_inputs(epoch=0.0):
    g = torch.Generator().manual_seed(0)
    students = [
        torch.randn(2, 4, 8, 8, generator=g),
        torch.randn(2, 8, 4, 4, generator=g),
        torch.randn(2, 8, generator=g),
    ]
    teachers = [
        torch.randn(2, 6, 8, 8, generator=g),
        torch.randn(2, 12, 4, 4, generator=g),
        torch.randn(2, 12, generator=g),
    ]
    return MethodInputs(torch.zeros(2, 3), student_features=students, teacher_features=teachers, epoch=epoch)


def test_reviewkd_fuses_deep_to_shallow_and_ramps_in():
    method = create("reviewkd").eval()
    with pytest.raises(RuntimeError, match="example_input="):
        method(review_inputs())
    example = review_inputs()
    method.setup(example.student_features, example.teacher_features)
    assert [f.gate is not None for f in method.fusions] == [True, True, False]  # the deepest stage starts the review
    assert method.fusions[0].reduce[0].out_channels == 8  # min(512, deepest student channels)
    inputs = review_inputs(epoch=10.0)
    half, full = method(inputs)["reviewkd"], method(review_inputs(epoch=25.0))["reviewkd"]
    assert torch.allclose(half, 0.5 * full) and full > 0
    # the shallowest fused map depends on the deepest student stage (the review path)
    captured = {}
    method.fusions[0].register_forward_hook(lambda module, args, out: captured.update(out=out[0]))
    inputs.student_features[2].requires_grad_(True)
    method(inputs)
    grad = torch.autograd.grad(captured["out"].sum(), inputs.student_features[2])[0]
    assert grad.abs().sum() > 0
    inputs.teacher_features[2] = torch.randn(2, 13)
    with pytest.raises(ValueError, match=r"teacher features have \[6, 12, 13\] channels.*built for \[6, 12, 12\]"):
        method(inputs)


def test_reviewkd_defaults_and_training():
    assert create("reviewkd").default_weight == 5.0
    spec = {
        "name": "reviewkd",
        "pairs": [["block1", "block1"], ["block2", "block2"], ["head:in", "head:in"]],
        "warmup_epochs": 0,
    }
    assert_trains(spec)
