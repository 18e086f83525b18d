import math

import pytest
import torch
from naive_logits import column, kl, mean, random_case, rows, softmax

from fisherkd import functional as Fn
from fisherkd.methods import create
from helpers import assert_trains


def naive_mlkd(s, t, temperatures) -> float:
    total = 0.0
    for tau in temperatures:
        ps = [softmax(z, tau) for z in rows(s)]
        pt = [softmax(z, tau) for z in rows(t)]
        n, c = len(ps), len(ps[0])
        instance = tau * tau * mean([kl(b, a) for a, b in zip(ps, pt)])

        def dot(u, v):
            return sum(x * y for x, y in zip(u, v))

        batch = sum((dot(pt[i], pt[j]) - dot(ps[i], ps[j])) ** 2 for i in range(n) for j in range(n)) / n
        classes = (
            sum(
                (dot(column(pt, a), column(pt, b)) - dot(column(ps, a), column(ps, b))) ** 2
                for a in range(c)
                for b in range(c)
            )
            / c
        )
        total += instance + batch + classes
    return total


@pytest.mark.parametrize("shape", [(4, 3), (7, 10), (2, 20), (1, 5)])
@pytest.mark.parametrize("temperatures", [(2.0, 3.0, 4.0, 5.0, 6.0), (1.0,)])
def test_mlkd_matches_naive_loop(shape, temperatures):
    s, t, _ = random_case(shape, seed=shape[1])
    assert math.isclose(Fn.mlkd(s, t, temperatures).item(), naive_mlkd(s, t, temperatures), rel_tol=1e-9)


def test_mlkd_is_zero_for_a_perfect_student_and_adds_relations_to_multi_temperature_kd():
    s, t, _ = random_case((5, 7), seed=1)
    assert Fn.mlkd(t, t.clone()).item() == 0.0
    # The batch and class terms are squared norms, so they only add to the instance (KD) terms.
    kd_sum = sum(Fn.kd(s, t, tau) for tau in (2.0, 3.0, 4.0, 5.0, 6.0))
    assert Fn.mlkd(s, t).item() > kd_sum.item()


def test_mlkd_gradcheck():
    s, t, _ = random_case((3, 4), seed=2)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: Fn.mlkd(a, t, (1.0, 2.0)), (s,))


def test_mlkd_defaults_and_training():
    method = create("mlkd")
    assert method.hparams.temperatures == (2.0, 3.0, 4.0, 5.0, 6.0) and method.default_weight == 0.9
    assert_trains({"name": "mlkd"})
