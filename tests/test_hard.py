"""HARD (Nix, Burg & Sinz 2023): a learned augmenter that maximises teacher-student disagreement within bounds."""

import copy
import math

import pytest
import torch
from torch import nn

from fisherkd.config import ConfigError, TrainConfig, build_config
from fisherkd.data import ArrayDataset, DataSplits
from fisherkd.data.hard import HardAugmentation, HardAugmenter, HardConfig, disagreement, warp
from fisherkd.distiller import Distiller
from fisherkd.engine import Trainer, load_checkpoint
from fisherkd.errors import CheckpointError
from fisherkd.run import train
from fisherkd.tracking import read_metrics


def scrambled(augmenter: HardAugmenter, scale: float = 50.0) -> HardAugmenter:
    """The augmenter with large random weights everywhere: its raw outputs far beyond any bound."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in augmenter.net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return augmenter


@pytest.mark.parametrize("shape", [(40,), (2, 40), (3, 16, 16)])
def test_warp_parameters_never_exceed_their_bounds(shape):
    config = HardConfig(translate=0.1, scale=0.3, rotate=20.0)
    augmenter = scrambled(HardAugmenter(shape, config))
    params = augmenter.params(torch.randn(256, *shape) * 10)
    bounds = [0.1, 0.1, 0.3, math.radians(20.0)] if len(shape) == 3 else [0.1, 0.3]
    assert params.shape == (256, len(bounds))
    for column, bound in zip(params.T, bounds):
        assert column.abs().max() <= bound
        assert column.abs().max() > 0.9 * bound  # the weights do push against the bounds


def test_a_signal_moves_no_further_than_the_translation_bound():
    length, translate = 40, 0.125  # at most 5 steps
    augmenter = scrambled(HardAugmenter((length,), HardConfig(translate=translate, scale=0.0)))
    spike = torch.zeros(64, length)
    spike[:, 20] = 1.0
    moved = augmenter(spike + 0.01 * torch.randn(64, length)).argmax(-1)
    assert (moved - 20).abs().max() <= translate * length + 1  # +1: bilinear rounding of a fractional shift
    assert (moved - 20).abs().max() >= 3  # and it does move


def test_an_image_moves_no_further_than_the_translation_bound():
    side, translate = 16, 0.25  # at most 4 pixels each way
    augmenter = scrambled(HardAugmenter((1, side, side), HardConfig(translate=translate, scale=0.0, rotate=0.0)))
    dot = torch.zeros(32, 1, side, side)
    dot[:, 0, 8, 8] = 1.0
    flat = augmenter(dot + 0.01 * torch.rand(32, 1, side, side)).flatten(1).argmax(-1)
    rows, cols = flat // side, flat % side
    assert (rows - 8).abs().max() <= translate * side + 1 and (cols - 8).abs().max() <= translate * side + 1


@pytest.mark.parametrize("shape", [(5, 40), (5, 2, 40), (5, 3, 12, 10)])
def test_zero_parameters_are_the_identity(shape):
    x = torch.randn(shape)
    params = torch.zeros(shape[0], 4 if len(shape) == 4 else 2)
    assert torch.allclose(warp(x, params), x, atol=1e-5)  # float rounding of the sampling grid
    # a fresh augmenter (last layer at zero) is the identity too, whatever its noise
    assert torch.allclose(HardAugmenter(shape[1:], HardConfig())(x), x, atol=1e-5)


def test_a_shift_of_one_step_moves_the_signal_by_one_step():
    # the convention of warp, checked against a hand-made shift: shift = 1/L moves the content one step left
    x = torch.randn(3, 20)
    shifted = warp(x, torch.tensor([[1 / 20, 0.0]] * 3))
    assert torch.allclose(shifted[:, :-1], x[:, 1:], atol=1e-5)
    assert torch.all(shifted[:, -1] == 0)  # zero padding


def pair(shape: tuple[int, ...], seed: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    features = math.prod(shape)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(features, 32), nn.Tanh(), nn.Linear(32, 5))
    student = nn.Sequential(nn.Flatten(), nn.Linear(features, 8), nn.Tanh(), nn.Linear(8, 5))
    return teacher.eval().requires_grad_(False), student


@pytest.mark.parametrize("shape", [(40,), (1, 12, 12)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_augmenter_step_increases_the_disagreement_on_a_fixed_batch(shape, seed):
    teacher, student = pair(shape, seed)
    x = torch.randn(64, *shape)
    hard = HardAugmentation(HardConfig(optimizer="sgd", lr=0.05), shape)
    student_before = copy.deepcopy(student.state_dict())
    for _ in range(3):  # from the identity, and from wherever the previous step left it
        torch.manual_seed(100)  # the same noise for the step and for the measurement after it
        before = hard.update(teacher, student, x)
        torch.manual_seed(100)
        augmented = hard(x)
        after = disagreement(student(augmented), teacher(augmented))
        assert after > before
    # independently of the augmenter's own code: the KL on its output is higher than on the clean batch
    augmented = hard(x)
    assert disagreement(student(augmented), teacher(augmented)) > disagreement(student(x), teacher(x))
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in student_before.items())
    assert all(p.grad is None for p in student.parameters()) and all(p.grad is None for p in teacher.parameters())


def toy_splits(n: int = 96, seed: int = 0) -> DataSplits:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 32, 40, generator=g)
    y = (x[:, :10].sum(1) > 0).long() + 2 * (x[:, 10:20].sum(1) > 0).long()
    return DataSplits("toy", ArrayDataset(x[:n], y[:n]), ArrayDataset(x[n:], y[n:]), 4, (40,))


def bn_student() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(40, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def trained_student(hard: dict | None, epochs: int = 2) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(7)
    teacher = nn.Sequential(nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 4))
    student = bn_student()
    augment = {"hard": hard} if hard is not None else {}
    config = TrainConfig(epochs=epochs, batch_size=16, optimizer={"name": "sgd", "lr": 0.1}, augment=augment)
    Trainer(Distiller(student, teacher, [{"name": "kd", "weight": 1.0}]), toy_splits(), config).fit()
    return student, teacher


def test_the_student_step_is_unchanged_when_the_augmenter_is_the_identity():
    # bounds of zero: the augmenter trains (and draws its noise) but cannot move anything; its extra forward pass
    # through the student must leave the batch-norm statistics and the gradients as they were
    plain, _ = trained_student(None)
    identity, _ = trained_student({"translate": 0.0, "scale": 0.0, "lr": 0.1})
    for (name, a), b in zip(plain.state_dict().items(), identity.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name
    moving, _ = trained_student({"translate": 0.2, "scale": 0.2, "lr": 0.1})
    assert not torch.allclose(plain[0].weight, moving[0].weight, atol=1e-3)  # the same run with room to move differs


def test_the_teacher_stays_frozen_and_in_eval_mode():
    torch.manual_seed(7)
    teacher_before = nn.Sequential(nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 4)).state_dict()
    _, teacher = trained_student({"lr": 0.1})
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())


def test_hard_needs_a_teacher():
    config = TrainConfig(epochs=1, batch_size=16, augment={"hard": {}})
    with pytest.raises(ValueError, match="augment.hard .* no teacher"):
        Trainer(Distiller(bn_student(), None, ["ce"]), toy_splits(), config)


def run_config(tmp_path, **hard) -> dict:
    return {
        "name": "hard",
        "output_dir": str(tmp_path / "runs"),
        "teacher": {"name": "cnn1d", "kwargs": {"channels": 4}, "train": {"epochs": 1, "batch_size": 32}},
        "student": {"name": "mlp", "kwargs": {"hidden": [16]}},
        "methods": [{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9}],
        "train": {
            "epochs": 3, "batch_size": 16, "log_every": 1, "optimizer": {"name": "sgd", "lr": 0.05},
            "augment": {"noise": 0.1, "hard": {"every": 2, "lr": 0.01, **hard}},
        },
    }


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path / "cache"))
    splits = toy_splits()
    config = build_config(run_config(tmp_path))
    full = train(config, run_dir=tmp_path / "full", splits=splits)
    assert train(config, run_dir=tmp_path / "cut", splits=splits, stop_after_steps=7) == {"stopped_at_step": 7}
    resumed = train(config, run_dir=tmp_path / "cut", splits=splits, resume=True)

    def rows(run):
        return [(r["step"], r["loss"], r["hard_kl"]) for r in read_metrics(tmp_path / run / "metrics.jsonl")
                if r["split"] == "train"]

    assert rows("cut") == rows("full") and len(rows("full")) == 18
    assert resumed["test_accuracy"] == full["test_accuracy"]
    a, b = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt") for run in ("full", "cut"))
    assert all(torch.equal(a["distiller"][k], b["distiller"][k]) for k in a["distiller"])
    for key, value in a["hard"]["augmenter"].items():
        assert torch.equal(value, b["hard"]["augmenter"][key]), key
    assert a["hard"]["optimizer"]["state"][0]["step"] == 9  # every=2 over 18 steps: updates at steps 0, 2, ..., 16


@pytest.mark.parametrize("started_with_hard", [False, True])
def test_a_checkpoint_and_a_config_that_differ_in_hard_are_refused_on_resume(tmp_path, monkeypatch, started_with_hard):
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path / "cache"))
    with_hard, without = run_config(tmp_path), run_config(tmp_path)
    del without["train"]["augment"]["hard"]
    first, then = (with_hard, without) if started_with_hard else (without, with_hard)
    train(build_config(first), run_dir=tmp_path / "run", splits=toy_splits(), stop_after_steps=3)
    message = "has a HARD augmenter but train.augment.hard is off" if started_with_hard else "has no HARD augmenter"
    with pytest.raises(CheckpointError, match=message):
        train(build_config(then), run_dir=tmp_path / "run", splits=toy_splits(), resume=True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train.augment.hard.lr": -1}, "train.augment.hard.lr"),
        ({"train.augment.hard.scale": 1.0}, "train.augment.hard.scale"),
        ({"train.augment.hard.every": 0}, "train.augment.hard.every"),
        ({"train.augment.hard.optimizer": "lbfgs"}, "train.augment.hard.optimizer"),
        ({"train.augment.hard.translte": 0.1}, "train.augment.hard.translte: unknown key; did you mean: translate"),
        ({"teacher": None}, "train.augment.hard: HARD learns inputs where teacher and student disagree"),
        ({"teacher.train.augment.hard": {}}, "teacher.train: augment.hard .* set it in the run's train.augment"),
    ],
)
def test_config_errors_name_the_key_and_the_fix(tmp_path, change, message):
    raw = run_config(tmp_path)
    overrides = [f"{k}={v}" if not isinstance(v, dict) else f"{k}={{}}" for k, v in change.items()]
    if change == {"teacher": None}:
        del raw["teacher"]
        raw["methods"] = [{"name": "ce"}]
        overrides = []
    with pytest.raises(ConfigError, match=message):
        build_config(raw, overrides)
