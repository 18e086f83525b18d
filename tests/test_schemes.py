"""Training schemes: multi-teacher ensembles, EMA and born-again self-distillation, dual-head students."""

import math

import pytest
import torch
import torch.nn.functional as F

from fisherkd.config import ConfigError, build_config
from fisherkd.distiller import Distiller
from fisherkd.engine import load_checkpoint
from fisherkd.run import get_teacher, teacher_cache_path, train
from fisherkd.schemes import EMATeacher, EnsembleTeacher, add_dual_head, load_student_weights
from fisherkd.tracking import read_metrics
from helpers import TinyCNN, assert_trains, tiny_image_batch
from test_engine import step_losses, toy_config, toy_splits


def members(n: int = 3) -> list[TinyCNN]:
    torch.manual_seed(0)
    return [TinyCNN(width=4 + k).eval() for k in range(n)]


def naive_ensemble(logits: list[torch.Tensor], weights: list[list[float]]) -> torch.Tensor:
    """log Σ_k w_kn p_kn, one sample and one class at a time."""
    out = torch.empty_like(logits[0])
    for n in range(out.shape[0]):
        probs = [[math.exp(v) / sum(math.exp(u) for u in z[n].tolist()) for v in z[n].tolist()] for z in logits]
        for c in range(out.shape[1]):
            out[n, c] = math.log(sum(weights[k][n] * probs[k][c] for k in range(len(logits))))
    return out


@torch.no_grad()
def test_ensemble_logits_equal_a_naive_computation():
    models, (x, _) = members(), tiny_image_batch()
    logits = [m(x) for m in models]
    uniform = [[1 / 3] * len(x)] * 3
    assert torch.allclose(EnsembleTeacher(models)(x), naive_ensemble(logits, uniform), atol=1e-5)
    assert torch.allclose(EnsembleTeacher(models, average="logits")(x), sum(logits) / 3, atol=1e-6)
    # fixed weights times per-sample confidence ‖p‖², renormalised over the members
    prior = [0.5, 0.3, 0.2]
    confidence = [[sum(p * p for p in F.softmax(z[n], -1).tolist()) for n in range(len(x))] for z in logits]
    raw = [[prior[k] * confidence[k][n] for n in range(len(x))] for k in range(3)]
    weights = [[raw[k][n] / sum(raw[j][n] for j in range(3)) for n in range(len(x))] for k in range(3)]
    got = EnsembleTeacher(models, [5, 3, 2], weighting="confidence")(x)
    assert torch.allclose(got, naive_ensemble(logits, weights), atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("weighting", ["fixed", "confidence"])
def test_one_hot_weights_give_that_teacher(weighting):
    models, (x, _) = members(), tiny_image_batch()
    for j, model in enumerate(models):
        one_hot = [float(k == j) for k in range(3)]
        probs = EnsembleTeacher(models, one_hot, weighting=weighting)(x).softmax(-1)
        assert torch.allclose(probs, model(x).softmax(-1), atol=1e-6)
        logits = EnsembleTeacher(models, one_hot, average="logits", weighting=weighting)(x)
        assert torch.equal(logits, model(x))
    with pytest.raises(ValueError, match="3 non-negative numbers"):
        EnsembleTeacher(models, [1.0, -1.0, 1.0])


def test_ensemble_members_are_tapped_by_name_and_stay_frozen():
    ensemble = EnsembleTeacher(members(2))
    before = {k: v.clone() for k, v in ensemble.state_dict().items()}
    assert_trains({"name": "fitnet", "pairs": [["block2", "members.1.block2"]]}, teacher=ensemble, steps=10)
    assert all(torch.equal(before[k], v) for k, v in ensemble.state_dict().items())


def test_ema_teacher_follows_the_formula_and_is_never_touched_by_the_optimizer():
    torch.manual_seed(0)
    student, (x, y) = TinyCNN(width=4), tiny_image_batch()
    teacher = EMATeacher(student, decay=0.9)
    distiller = Distiller(student, teacher, ["ce", "kd"])
    # the student stays trainable and is not a submodule of its teacher (no second copy in the state dict)
    assert all(p.requires_grad for p in student.parameters())
    assert not any(k.startswith("teacher.student") for k in distiller.state_dict())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in distiller.trainable_parameters()}
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1)
    expected = [p.detach().clone() for p in student.parameters()]
    distiller.train()
    for _ in range(3):
        out = distiller(x, y)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        distiller.after_optimizer_step()
        expected = [0.9 * e + 0.1 * s.detach() for e, s in zip(expected, student.parameters())]
        assert all(torch.allclose(t, e, atol=1e-6) for t, e in zip(teacher.model.parameters(), expected))
        assert all(torch.equal(t, s) for t, s in zip(teacher.model.buffers(), student.buffers()))
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training and not torch.equal(teacher.model.head.weight, student.head.weight)
    assert any(k.startswith("teacher.model.") for k in distiller.training_state_dict())
    distiller.close()


def test_resume_with_an_ema_teacher_is_exact(tmp_path, monkeypatch):
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path / "cache"))
    raw = toy_config(tmp_path, epochs=2)
    raw["teacher"] = {"ema_decay": 0.9}
    raw["methods"] = [
        {"name": "ce", "weight": 0.5},
        {"name": "kd", "weight": 0.5},
        {"name": "fitnet", "weight": 1.0, "pairs": [["features", "model.features"]]},
    ]
    config, splits = build_config(raw), toy_splits()
    full = train(config, run_dir=tmp_path / "full", splits=splits)
    assert full["teacher"] == {"source": "ema", "decay": 0.9}
    assert train(config, run_dir=tmp_path / "cut", splits=splits, stop_after_steps=4) == {"stopped_at_step": 4}
    train(config, run_dir=tmp_path / "cut", splits=splits, resume=True)
    assert step_losses(tmp_path / "cut") == step_losses(tmp_path / "full")
    weights_full = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["distiller"]
    weights_cut = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["distiller"]
    assert any(k.startswith("teacher.model.") for k in weights_full) and weights_full.keys() == weights_cut.keys()
    assert all(torch.equal(weights_full[k], weights_cut[k]) for k in weights_full)


def test_born_again_teacher_is_the_student_of_an_earlier_run(tmp_path, monkeypatch):
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path / "cache"))
    raw = toy_config(tmp_path, epochs=1)
    raw["teacher"], raw["methods"] = None, [{"name": "ce"}]
    splits = toy_splits()
    first = train(build_config(raw), run_dir=tmp_path / "gen1", splits=splits)
    saved = load_checkpoint(tmp_path / "gen1" / "checkpoints" / "last.pt")["distiller"]
    weights = load_student_weights(tmp_path / "gen1")
    assert weights.keys() == {k.removeprefix("student.") for k in saved if k.startswith("student.")}
    raw["teacher"] = {**raw["student"], "checkpoint": str(tmp_path / "gen1")}
    raw["methods"] = [{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9}]
    config = build_config(raw)
    teacher, record = get_teacher(config, splits)
    assert record["source"] == str(tmp_path / "gen1")
    assert all(torch.equal(v, weights[k]) for k, v in teacher.state_dict().items())
    second = train(config, run_dir=tmp_path / "gen2", splits=splits)
    assert second["test_teacher_accuracy"] == first["test_accuracy"]


def test_dual_head_trains_its_heads_apart_and_averages_them_at_inference():
    torch.manual_seed(0)
    student, (x, y) = add_dual_head(TinyCNN(width=4), "head"), tiny_image_batch()
    heads = student.head
    specs = [{"name": "ce"}, {"name": "dual_head", "pairs": [["head.distill", ""]]}]
    distiller = Distiller(student, TinyCNN(width=8), specs, example_input=x[:2])
    out = distiller(x, y)
    features = student.pool(student.block2(student.block1(x)))
    assert torch.allclose(out.logits, heads.label(features)) and set(out.losses) == {"ce", "dual_head.kd"}
    # labels reach only the label head, the teacher only the distillation head
    ce_grads = torch.autograd.grad(out.losses["ce"], [heads.label.weight, heads.distill.weight], allow_unused=True)
    kd_grads = torch.autograd.grad(
        out.losses["dual_head.kd"], [heads.label.weight, heads.distill.weight], allow_unused=True
    )
    assert ce_grads[1] is None and kd_grads[0] is None
    assert ce_grads[0].abs().sum() > 0 and kd_grads[1].abs().sum() > 0
    distiller.eval()
    with torch.no_grad():
        features = student.pool(student.block2(student.block1(x)))  # BatchNorm now uses its running statistics
        assert torch.allclose(student(x), (heads.label(features) + heads.distill(features)) / 2)
    distiller.close()


def test_dual_head_trains_end_to_end_from_a_config(tmp_path, monkeypatch):
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path / "cache"))
    raw = toy_config(tmp_path, epochs=3, augment={})
    raw["student"]["dual_head"] = "head"
    dual_head = {"name": "dual_head", "loss_params": {"temperature": 2}, "pairs": [["head.distill", ""]]}
    raw["methods"] = [{"name": "ce"}, dual_head]
    summary = train(build_config(raw), run_dir=tmp_path / "dual", splits=toy_splits())
    losses = [loss for _, loss in step_losses(tmp_path / "dual")]
    assert all(math.isfinite(v) for v in losses) and sum(losses[-6:]) < sum(losses[:6])
    assert {"ce", "dual_head.kd"} <= set(read_metrics(tmp_path / "dual" / "metrics.jsonl")[0])
    assert math.isfinite(summary["test_accuracy"])
    with pytest.raises(ConfigError, match="loss 'ce' is a label method"):
        build_config({**raw, "methods": [{"name": "dual_head", "loss": "ce", "pairs": [["head.distill", ""]]}]})


def test_ensemble_from_a_config_caches_each_member_like_a_single_teacher(tmp_path, monkeypatch):
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path / "cache"))
    raw = toy_config(tmp_path, epochs=1)
    single = raw["teacher"]
    raw["teacher"] = {
        "members": [single, {**single, "seed": 1}],
        "member_weights": [2, 1],
        "ensemble_weighting": "confidence",
    }
    raw["methods"][2]["pairs"] = [["features", "members.0.features"]]
    config, splits = build_config(raw), toy_splits()
    summary = train(config, splits=splits)
    assert [m["source"] for m in summary["teacher"]["members"]] == ["trained", "trained"]
    alone = build_config({**raw, "teacher": single}).teacher
    assert teacher_cache_path(config.teacher.members[0], config.data.model_dump(mode="json")) == teacher_cache_path(
        alone, config.data.model_dump(mode="json")
    )
    teacher, record = get_teacher(config, splits)
    assert isinstance(teacher, EnsembleTeacher) and [m["source"] for m in record["members"]] == ["cache", "cache"]
    assert teacher.weighting == "confidence" and torch.allclose(teacher.prior, torch.tensor([2 / 3, 1 / 3]))


@pytest.mark.parametrize(
    ("teacher", "message"),
    [
        ({"name": "cnn1d", "ema_decay": 0.9}, "got name and ema_decay"),
        ({}, "got none of them"),
        ({"members": [{"name": "cnn1d"}], "member_weights": [1, 2]}, "need 1 non-negative weights"),
        ({"name": "cnn1d", "ensemble_weighting": "confidence"}, "need members"),
        ({"members": [{"ema_decay": 0.9}]}, "must be single models"),
        ({"ema_decay": 0.9, "checkpoint": "x.pt"}, "belong to one teacher model"),
        ({"ema_decay": 1.5}, "less than or equal to 1"),
    ],
)
def test_teacher_config_errors(tmp_path, teacher, message):
    with pytest.raises(ConfigError, match=message):
        build_config({**toy_config(tmp_path), "teacher": teacher})


def test_shape_built_methods_train_from_a_config_without_dimensions(tmp_path, monkeypatch):
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path / "cache"))
    raw = toy_config(tmp_path, epochs=1)
    pair = [["features", "features"]]
    raw["methods"] = [
        {"name": "ce"},
        {"name": "vid", "pairs": pair},
        {"name": "cc", "pairs": pair},
        {"name": "crd", "pairs": pair, "num_data": 96, "nce_k": 32},
        {"name": "reviewkd", "pairs": pair, "warmup_epochs": 0},
    ]
    summary = train(build_config(raw), run_dir=tmp_path / "shapes", splits=toy_splits())
    rows = read_metrics(tmp_path / "shapes" / "metrics.jsonl")
    assert {"vid", "cc", "crd", "reviewkd"} <= set(rows[0])
    assert all(math.isfinite(r["loss"]) for r in rows if r["split"] == "train")
    assert math.isfinite(summary["test_accuracy"])
