"""MCMI teachers (Ye et al., ICLR 2024): the per-batch CMI estimator, its gradient, the teacher-training option and
its cache key."""

import hashlib
import json
import math

import pytest
import torch

from fisherkd import functional as Fn
from fisherkd.config import ConfigError, TeacherConfig, build_config
from fisherkd.distiller import Distiller
from fisherkd.methods import MethodInputs, create
from fisherkd.run import SCHEME_FIELDS, teacher_cache_path, train


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_cmi_by_hand_two_classes():
    # class 0: (0.8, 0.2) and (0.4, 0.6), whose mean is (0.6, 0.4); class 1: (0.3, 0.7) alone, its own mean
    probs = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.4, 0.6]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0])
    expected = (kl([0.8, 0.2], [0.6, 0.4]) + 0.0 + kl([0.4, 0.6], [0.6, 0.4])) / 3
    # by hand: 0.8 ln(4/3) + 0.2 ln(1/2) = 0.0915..., 0.4 ln(2/3) + 0.6 ln(3/2) = 0.2 ln(3/2) = 0.0811...
    assert math.isclose(expected, (0.8 * math.log(4 / 3) - 0.2 * math.log(2) + 0.2 * math.log(1.5)) / 3)
    assert math.isclose(Fn.cmi(probs.log(), y).item(), expected, rel_tol=1e-12)
    # the logits' shift per row is irrelevant, and a temperature acts on the logits
    shifted = probs.log() + torch.tensor([[3.0], [-1.0], [0.5]], dtype=torch.float64)
    assert math.isclose(Fn.cmi(shifted, y).item(), expected, rel_tol=1e-12)
    assert math.isclose(Fn.cmi(2 * probs.log(), y, temperature=2.0).item(), expected, rel_tol=1e-12)


def test_cmi_is_the_entropy_gap_within_each_class():
    # the mean KL to the mean is H(mean) − mean H (a generalised Jensen-Shannon divergence), per class, weighted by
    # the class's share of the batch: an identity, checked on random outputs
    g = torch.Generator().manual_seed(0)
    z = torch.randn(12, 5, generator=g, dtype=torch.float64) * 2
    y = torch.tensor([0, 1, 2, 0, 1, 0, 3, 3, 1, 0, 2, 4])

    def entropy(p):
        return -(p * p.log()).sum(-1)

    p = z.softmax(-1)
    share = [int((y == c).sum()) / len(y) for c in range(5)]
    expected = sum(share[c] * (entropy(p[y == c].mean(0)) - entropy(p[y == c]).mean()) for c in range(5))
    assert math.isclose(Fn.cmi(z, y).item(), float(expected), rel_tol=1e-10)


def test_unlabelled_rows_are_left_out_and_identical_outputs_give_zero():
    z = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 0.0], [5.0, -5.0, 0.0]])
    y = torch.tensor([0, 0, -100])
    assert torch.allclose(Fn.cmi(z, y), Fn.cmi(z[:2], y[:2]))
    assert Fn.cmi(z[[0, 0, 0]], torch.tensor([1, 1, 1])).item() == pytest.approx(0.0, abs=1e-7)
    assert Fn.cmi(z, torch.full((3,), -100)).item() == 0.0
    assert torch.isfinite(Fn.cmi(torch.tensor([[200.0, -200.0], [-200.0, 200.0]]), torch.tensor([0, 0])))


def test_maximising_cmi_spreads_the_outputs_of_a_class():
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(8, 4, generator=g) * 0.3).requires_grad_()
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    # the term is −CMI: a descent step on it is an ascent step on CMI
    loss = create("mcmi")(MethodInputs(student_logits=z, target=y))["mcmi"]
    (grad,) = torch.autograd.grad(loss, z)
    stepped = (z - 0.5 * grad).detach()

    def spread(logits):  # mean distance of each output to its class's mean output
        p = logits.softmax(-1)
        return sum((p[y == c] - p[y == c].mean(0)).norm(dim=-1).mean() for c in (0, 1))

    assert loss.item() < 0
    assert spread(stepped) > spread(z.detach())
    assert Fn.cmi(stepped, y) > Fn.cmi(z.detach(), y)


def test_mcmi_with_ce_in_a_distiller_is_ce_minus_lambda_cmi():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    x, y = torch.randn(10, 6), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    out = Distiller(model, None, ["ce", {"name": "mcmi", "weight": 0.15}])(x, y)
    z = model(x)
    expected = torch.nn.functional.cross_entropy(z, y) - 0.15 * Fn.cmi(z, y)
    assert torch.allclose(out.loss, expected)
    assert Distiller(model, None, ["mcmi"]).loss_weights == [0.25]  # the authors' λ


def teacher(**train) -> TeacherConfig:
    return TeacherConfig(name="cnn1d", train={"epochs": 1, **train})


def test_the_cache_key_includes_mcmi_and_keeps_plain_teachers_where_they_were():
    data = {"name": "mnist1d"}
    plain, mcmi = teacher(), teacher(mcmi={})
    assert teacher_cache_path(plain, data) != teacher_cache_path(mcmi, data)
    assert teacher_cache_path(mcmi, data) != teacher_cache_path(teacher(mcmi={"weight": 0.1}), data)
    assert teacher_cache_path(mcmi, data) == teacher_cache_path(teacher(mcmi={"weight": 0.25, "temperature": 1}), data)
    # a plain teacher's key is what it was before the option existed: the dump without mcmi and augment.hard
    dump = plain.model_dump(mode="json", exclude=SCHEME_FIELDS)
    del dump["train"]["mcmi"], dump["train"]["augment"]["hard"]
    digest = hashlib.sha256(json.dumps({"teacher": dump, "data": data}, sort_keys=True).encode()).hexdigest()[:16]
    assert teacher_cache_path(plain, data).name == f"cnn1d-{digest}.pt"


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"mcmi": {"weight": -1}}, "teacher.train.mcmi.weight"),
        ({"mcmi": {"lambda": 0.2}}, "teacher.train.mcmi.lambda: unknown key"),
        ({"mcmi": {"temperature": 0}}, "teacher.train.mcmi.temperature"),
    ],
)
def test_mcmi_config_errors_name_the_key(train, message):
    raw = {"teacher": {"name": "cnn1d", "train": train}, "student": {"name": "mlp"}}
    with pytest.raises(ConfigError, match=message):
        build_config(raw)


def test_students_have_no_mcmi_option():
    with pytest.raises(ConfigError, match="train.mcmi: unknown key"):
        build_config({"student": {"name": "mlp"}, "train": {"mcmi": {}}})


def test_an_mcmi_teacher_trains_end_to_end_on_mnist1d_and_is_cached_apart(tmp_path, monkeypatch):
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path / "cache"))
    import fisherkd.run as run

    built = []
    distiller = run.Distiller

    def spy(model, teacher, methods, *args):
        built.append([m if isinstance(m, str) else m["name"] if isinstance(m, dict) else m.name for m in methods])
        return distiller(model, teacher, methods, *args)

    monkeypatch.setattr(run, "Distiller", spy)
    fast = {"epochs": 1, "batch_size": 50, "optimizer": {"name": "adam", "lr": 0.005}, "schedule": {"name": "constant"}}
    raw = {
        "output_dir": str(tmp_path / "runs"),
        "data": {"name": "mnist1d"},
        "teacher": {"name": "cnn1d", "kwargs": {"channels": 8}, "train": {**fast, "mcmi": {"weight": 0.25}}},
        "student": {"name": "mlp", "kwargs": {"hidden": [32]}},
        "methods": [{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9}],
        "train": fast,
    }
    summary = train(build_config(raw))
    assert summary["teacher"]["source"] == "trained"
    assert built[0] == ["ce", "mcmi"]  # the teacher's objective; then the student's
    assert math.isfinite(summary["test_accuracy"]) and summary["teacher"]["test_accuracy"] > 0.2  # chance: 0.1
    raw["teacher"]["train"].pop("mcmi")
    plain = train(build_config(raw))
    assert built[2] == ["ce"]
    assert plain["teacher"]["path"] != summary["teacher"]["path"]
    again = train(build_config({**raw, "teacher": {**raw["teacher"], "train": {**fast, "mcmi": {}}}}))
    assert again["teacher"]["source"] == "cache" and again["teacher"]["path"] == summary["teacher"]["path"]
