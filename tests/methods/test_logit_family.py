"""Checks shared by every logit loss: per-sample importance weights, low-precision inputs, registration."""

import pytest
import torch
from naive_logits import random_case

from fisherkd import functional as Fn
from fisherkd.methods import MethodInputs, available, create, describe, method_class
from fisherkd.methods.logits import LogitMethod, LogitParams

# Losses that are a mean over samples, as f(student, teacher, target, sample_weight); defaults unless the
# default would hide a code path (e.g. JSD at β strictly inside (0, 1)).
PER_SAMPLE = {
    "kd": lambda s, t, y, w=None: Fn.kd(s, t, sample_weight=w),
    "reverse_kl": lambda s, t, y, w=None: Fn.reverse_kl(s, t, sample_weight=w),
    "jsd": lambda s, t, y, w=None: Fn.jsd(s, t, 0.3, sample_weight=w),
    "tvd": lambda s, t, y, w=None: Fn.tvd(s, t, sample_weight=w),
    "skew_kl": lambda s, t, y, w=None: Fn.skew_kl(s, t, sample_weight=w),
    "skew_reverse_kl": lambda s, t, y, w=None: Fn.skew_reverse_kl(s, t, sample_weight=w),
    "dkd": lambda s, t, y, w=None: Fn.dkd(s, t, y, sample_weight=w),
    "nkd": lambda s, t, y, w=None: Fn.nkd(s, t, y, sample_weight=w),
    "ofa": lambda s, t, y, w=None: Fn.ofa(s, t, y, 1.5, sample_weight=w),
}
BATCH_LEVEL = {
    "dist": lambda s, t, y: Fn.dist(s, t),
    "sinkhorn": lambda s, t, y: Fn.sinkhorn(s, t),
    "mlkd": lambda s, t, y: Fn.mlkd(s, t),
}
ALL = {**PER_SAMPLE, **BATCH_LEVEL}


@pytest.mark.parametrize("name", PER_SAMPLE)
def test_unit_sample_weights_change_nothing(name):
    s, t, y = random_case((7, 6), seed=1)
    loss = PER_SAMPLE[name]
    assert torch.equal(loss(s, t, y, torch.ones(7, dtype=torch.float64)), loss(s, t, y))


@pytest.mark.parametrize("name", PER_SAMPLE)
def test_sample_weights_select_and_mix_samples(name):
    s, t, y = random_case((5, 6), seed=2)
    loss = PER_SAMPLE[name]
    alone = [loss(s[n : n + 1], t[n : n + 1], y[n : n + 1]) for n in range(5)]
    for k in range(5):
        one_hot = torch.zeros(5, dtype=torch.float64)
        one_hot[k] = 5.0  # mean 1, all of it on sample k
        assert torch.allclose(loss(s, t, y, one_hot), alone[k], rtol=1e-12, atol=1e-15)
    w = torch.tensor([0.2, 2.0, 0.5, 1.3, 1.0], dtype=torch.float64)
    assert torch.allclose(loss(s, t, y, w), sum(wn * ln for wn, ln in zip(w, alone)) / 5, rtol=1e-12)


@pytest.mark.parametrize("name", PER_SAMPLE)
def test_sample_weight_of_the_wrong_shape_is_an_error(name):
    s, t, y = random_case((4, 6), seed=3)
    with pytest.raises(ValueError, match="sample_weight"):
        PER_SAMPLE[name](s, t, y, torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("name", ["kd", "ls_kd", "ctkd", "reverse_kl", "jsd", "tvd", "skew_kl", "dkd", "nkd", "ofa"])
def test_methods_read_the_sample_weights(name):
    s, t, y = random_case((4, 6), seed=4)
    method = create(name)
    one_hot = torch.tensor([0.0, 0.0, 4.0, 0.0], dtype=torch.float64)
    weighted = method(MethodInputs(s, t, y, epoch=30.0, weights={"sample": one_hot}))
    alone = method(MethodInputs(s[2:3], t[2:3], y[2:3], epoch=30.0))
    assert torch.allclose(weighted[name], alone[name], rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ALL)
def test_low_precision_logits_are_computed_in_float32(name, dtype):
    s, t, y = random_case((8, 10), seed=5)
    s, t = s.float(), t.float()
    loss = ALL[name]
    low = loss(s.to(dtype), t.to(dtype), y)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    # Exactly the float32 computation on the rounded inputs, and close to the unrounded one.
    assert torch.equal(low, loss(s.to(dtype).float(), t.to(dtype).float(), y))
    full = loss(s, t, y)
    assert abs(low.item() - full.item()) <= 0.05 * abs(full.item()) + 1e-3


@pytest.mark.parametrize("name", available("logit"))
def test_logit_methods_are_documented(name):
    info = describe(name)
    assert info["family"] == "logit" and info["paper"] and info["summary"]
    assert info["defaults"]["standardize"] is (name == "ls_kd")


def _non_default(value):
    """A valid value different from a default, so a hyper-parameter that does not reach the loss shows."""
    if isinstance(value, tuple):
        return tuple(_non_default(v) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return value + 1 if isinstance(value, int) else value * 0.7


@pytest.mark.parametrize("name", [n for n in available("logit") if method_class(n).function is not None])
def test_declared_methods_pass_every_hyperparameter_label_and_weight_by_name(name):
    cls = method_class(name)
    hparams = {k: _non_default(v) for k, v in describe(name)["defaults"].items() if k != "standardize"}
    s, t, y = random_case((4, 6), seed=8)
    weights = {axis: torch.rand(6 if axis == "class" else 4, dtype=torch.float64) + 0.5 for axis in cls.weight_axes}
    method = create(name, **hparams)
    out = method(MethodInputs(s, t, y, weights=weights))[name]
    zs, zt = (Fn.standardize_logits(s), Fn.standardize_logits(t)) if method.hparams.standardize else (s, t)
    target = (y,) if cls.needs_target else ()
    expected = cls.function(zs, zt, *target, **hparams, **{f"{a}_weight": w for a, w in weights.items()})
    assert torch.equal(out, expected)
    assert not torch.equal(out, create(name)(MethodInputs(s, t, y, weights=weights))[name])  # the values matter


def test_a_declaration_the_function_cannot_take_fails_when_the_class_is_made():
    class Params(LogitParams):
        temprature: float = 1.0

    with pytest.raises(TypeError, match=r"tvd\(\) takes no argument temprature"):
        type("Broken", (LogitMethod,), {"function": staticmethod(Fn.tvd), "Params": Params})
    with pytest.raises(TypeError, match=r"dist\(\) takes no argument sample_weight"):
        type("Broken", (LogitMethod,), {"function": staticmethod(Fn.dist), "weight_axes": ("sample",)})
