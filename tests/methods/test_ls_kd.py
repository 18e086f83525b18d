import math

import pytest
import torch
from naive_logits import mean, random_case, rows

from fisherkd import functional as Fn
from fisherkd.methods import MethodInputs, available, create
from helpers import assert_trains


def naive_standardize(z: list[float], eps: float = 1e-7) -> list[float]:
    mu = mean(z)
    std = math.sqrt(sum((v - mu) ** 2 for v in z) / (len(z) - 1))  # unbiased, as torch.std and the authors
    return [(v - mu) / (std + eps) for v in z]


def test_standardize_logits_matches_naive_loop():
    for shape in [(3, 4), (5, 100)]:
        z, _, _ = random_case(shape, seed=shape[1])
        got = Fn.standardize_logits(z).tolist()
        for got_row, row in zip(got, rows(z)):
            assert all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(got_row, naive_standardize(row)))


def test_ls_kd_is_kd_at_temperature_2_on_standardized_logits():
    s, t, y = random_case((6, 9), seed=1)
    got = create("ls_kd")(MethodInputs(s, t, y))["ls_kd"]
    assert torch.allclose(got, Fn.kd(Fn.standardize_logits(s), Fn.standardize_logits(t), 2.0), rtol=1e-12)


def test_ls_kd_ignores_each_sample_logit_scale_and_shift():
    s, t, y = random_case((6, 9), seed=2)
    scale, shift = torch.rand(6, 1, dtype=torch.float64) * 5 + 0.1, torch.randn(6, 1, dtype=torch.float64) * 10
    method = create("ls_kd")
    base = method(MethodInputs(s, t, y))["ls_kd"]
    assert torch.allclose(method(MethodInputs(scale * s + shift, t / scale - shift, y))["ls_kd"], base, rtol=1e-6)


@pytest.mark.parametrize("name", available("logit"))
def test_every_logit_method_can_standardize(name):
    s, t, y = random_case((8, 6), seed=3)
    plain = create(name, standardize=False)(
        MethodInputs(Fn.standardize_logits(s), Fn.standardize_logits(t), y, epoch=30.0)
    )
    standardized = create(name, standardize=True)(MethodInputs(s, t, y, epoch=30.0))
    assert plain.keys() == standardized.keys()
    for key in plain:
        assert torch.allclose(plain[key], standardized[key], rtol=1e-10, atol=1e-12)


def test_standardize_logits_gradcheck():
    z, _, _ = random_case((3, 5), seed=4)
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(Fn.standardize_logits, (z,))


def test_ls_kd_defaults_and_training():
    method = create("ls_kd")
    assert (method.hparams.standardize, method.hparams.temperature) == (True, 2.0)
    assert method.default_weight == 9.0 and create("kd").hparams.standardize is False
    assert_trains({"name": "ls_kd"})
