import math

import pytest
import torch

from fisherkd import functional as Fn
from fisherkd.methods import MethodInputs, create
from helpers import assert_trains


def unit_rows(x):
    rows = [x[b].flatten().tolist() for b in range(x.shape[0])]
    return [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in rows]


def taylor_kernel(x, gamma, order):
    r = unit_rows(x)
    out = []
    for a in r:
        row = []
        for z in r:
            dot = sum(u * v for u, v in zip(a, z))
            row.append(
                sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * dot**p for p in range(order + 1))
            )
        out.append(row)
    return out


def rbf_kernel(x, gamma):
    r = unit_rows(x)
    return [[math.exp(-gamma * sum((u - v) ** 2 for u, v in zip(a, z))) for z in r] for a in r]


def frobenius_mean(a, b):
    n = len(a)
    return sum((a[i][j] - b[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2


@pytest.mark.parametrize(
    ("s_shape", "t_shape", "gamma", "order"), [((4, 3), (4, 7), 0.4, 2), ((5, 2, 2), (5, 6), 1.0, 3)]
)
def test_cc_matches_naive_loop(s_shape, t_shape, gamma, order):
    s, t = torch.randn(s_shape, dtype=torch.float64), torch.randn(t_shape, dtype=torch.float64)
    expected = frobenius_mean(taylor_kernel(s, gamma, order), taylor_kernel(t, gamma, order))
    assert math.isclose(Fn.cc(s, t, gamma, order).item(), expected, rel_tol=1e-9)


def test_cc_high_order_converges_to_the_gaussian_kernel():
    s, t = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    expected = frobenius_mean(rbf_kernel(s, 0.4), rbf_kernel(t, 0.4))
    assert math.isclose(Fn.cc(s, t, 0.4, 25).item(), expected, rel_tol=1e-9)


def test_cc_gradcheck_and_bfloat16():
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: Fn.cc(a, t), (s,))
    s, t = torch.randn(16, 128), torch.randn(16, 128)
    low, high = Fn.cc(s.bfloat16(), t.bfloat16()), Fn.cc(s, t)
    assert torch.isfinite(low) and abs(low.item() - high.item()) < 0.1 * high.item()


def test_cc_method_builds_its_heads_from_shapes_and_checks_sizes():
    method = create("cc")
    s, t = torch.randn(4, 3, 2, 2), torch.randn(4, 20)
    inputs = MethodInputs(torch.zeros(4, 2), student_features=[s], teacher_features=[t])
    with pytest.raises(RuntimeError, match="example_input="):
        method(inputs)
    method.setup([s], [t])
    assert (method.embed_student.in_features, method.embed_teacher.in_features) == (12, 20)
    assert method.embed_student.out_features == method.embed_teacher.out_features == 128
    assert method.default_weight == 0.02 and (method.hparams.gamma, method.hparams.order) == (0.4, 2)
    assert torch.isfinite(method(inputs)["cc"])
    with pytest.raises(ValueError, match="flattens to 5 values, but its head was built for 12"):
        method(MethodInputs(torch.zeros(4, 2), student_features=[torch.randn(4, 5)], teacher_features=[t]))


def test_cc_trains():
    assert_trains({"name": "cc", "pairs": [["block2", "block2"]]})
