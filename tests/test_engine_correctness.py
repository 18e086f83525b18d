"""Engine correctness: best checkpoint across a resume, a stop at an epoch boundary, divergence, wrong checkpoints."""

import pytest
import torch
from torch import nn

from fisherkd.config import TrainConfig, build_config
from fisherkd.data import ArrayDataset, DataSplits
from fisherkd.distiller import Distiller
from fisherkd.engine import load_checkpoint
from fisherkd.engine import trainer as trainer_module
from fisherkd.engine.trainer import Trainer, TrainingDiverged
from fisherkd.errors import CheckpointError
from fisherkd.run import build_student, rebuild_distiller, train
from fisherkd.tracking import read_metrics


def toy_splits(n: int = 96, nan: bool = False) -> DataSplits:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + 32, 40, generator=g)
    y = (x[:, :10].sum(1) > 0).long() + 2 * (x[:, 10:20].sum(1) > 0).long()
    if nan:
        x = torch.full_like(x, float("nan"))
    return DataSplits("toy", ArrayDataset(x[:n], y[:n]), ArrayDataset(x[n:], y[n:]), 4, (40,))


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 8), nn.Tanh(), nn.Linear(8, 4))


def scripted_accuracies(monkeypatch, accuracies: list[float]) -> None:
    """Every evaluation returns the next of ``accuracies``: which model is best is then known in advance."""
    values = iter(accuracies)
    monkeypatch.setattr(trainer_module, "evaluate", lambda *args, **kwargs: {"accuracy": next(values)})


def weights(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["distiller"]


# -- item 1: best.pt across a resume ------------------------------------------------------------------------------
def test_a_resume_from_an_evaluation_checkpoint_never_replaces_best_by_a_worse_model(tmp_path, monkeypatch):
    # epochs score 0.5, 0.9, 0.7; the run dies in epoch 3, after epoch 2 wrote last.pt and best.pt, and resumes
    scripted_accuracies(monkeypatch, [0.5, 0.9, 0.7])
    config = TrainConfig(epochs=3, batch_size=16, log_every=1)  # 6 steps per epoch

    def make() -> Trainer:
        return Trainer(Distiller(mlp(), None, ["ce"]), toy_splits(), config, device="cpu", run_dir=tmp_path)

    class Crash(Exception):
        pass

    first = make()
    log = first._log_train

    def crash_in_epoch_3(*args):
        if first.step > 12:
            raise Crash
        log(*args)

    first._log_train = crash_in_epoch_3
    with pytest.raises(Crash):
        first.fit()
    best_before = weights(tmp_path / "checkpoints" / "best.pt")
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["best_accuracy"] == 0.9  # was the stale 0.5
    summary = make().fit(resume=True)
    assert summary["best_test_accuracy"] == 0.9 and summary["test_accuracy"] == 0.7
    best_after = weights(tmp_path / "checkpoints" / "best.pt")
    assert all(torch.equal(best_before[k], best_after[k]) for k in best_before)  # epoch 2's model, not epoch 3's


# -- item 2: a stop at an epoch boundary ---------------------------------------------------------------------------
def test_a_stop_at_the_end_of_an_epoch_evaluates_and_checkpoints_that_epoch_first(tmp_path, monkeypatch):
    scripted_accuracies(monkeypatch, [0.5])
    trainer = Trainer(Distiller(mlp(), None, ["ce"]), toy_splits(), TrainConfig(epochs=2, batch_size=16),
                      device="cpu", run_dir=tmp_path)
    assert trainer.fit(stop_after_steps=6) == {"stopped_at_step": 6}  # 6 steps per epoch
    assert trainer.history == [{"accuracy": 0.5, "epoch": 1}]
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["step"] == 6


def test_a_run_stopped_at_its_last_step_reports_its_last_epoch_after_resuming(tmp_path):
    config = build_config({
        "name": "toy", "output_dir": str(tmp_path / "runs"),
        "student": {"name": "mlp", "kwargs": {"hidden": [16]}}, "methods": [{"name": "ce"}],
        "train": {"epochs": 2, "batch_size": 16, "log_every": 1, "optimizer": {"name": "sgd", "lr": 0.05}},
    })
    full = train(config, run_dir=tmp_path / "full", splits=toy_splits())
    assert train(config, run_dir=tmp_path / "cut", splits=toy_splits(), stop_after_steps=12) == {"stopped_at_step": 12}
    resumed = train(config, run_dir=tmp_path / "cut", splits=toy_splits(), resume=True)
    tests = [r for r in read_metrics(tmp_path / "cut" / "metrics.jsonl") if r["split"] == "test"]
    assert [r["epoch"] for r in tests] == [1, 2]  # epoch 2 was evaluated before the stop (it used to be skipped)
    assert resumed["test_accuracy"] == full["test_accuracy"] and resumed["test_ece"] == full["test_ece"]


# -- item 3: divergence ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer,grad_clip", [({"name": "sgd", "lr": 0.1}, None), ({"name": "adamw"}, 1.0)])
def test_nan_inputs_stop_the_run_at_the_first_metrics_read_with_the_weights_untouched(tmp_path, optimizer, grad_clip):
    # An all-NaN dataset used to train to the end and report 100% test accuracy (NaN argmax = class 0).
    student = mlp()
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    config = TrainConfig(epochs=2, batch_size=16, log_every=4, optimizer=optimizer, grad_clip=grad_clip)
    trainer = Trainer(Distiller(student, None, ["ce"]), toy_splits(nan=True), config, device="cpu", run_dir=tmp_path)
    message = r"^training diverged: loss term 'ce' is nan at steps 1-4 \(no checkpoint yet\); lower the learning rate"
    with pytest.raises(TrainingDiverged, match=message):
        trainer.fit()
    assert trainer.step == 4
    assert not (tmp_path / "checkpoints").exists()
    # the fused optimizer skipped every update whose gradient was NaN (found_inf): the weights are the initial ones
    assert all(torch.equal(initial[k], v) for k, v in student.state_dict().items())


def test_a_stop_between_two_logs_checks_the_unread_steps_before_writing_its_checkpoint(tmp_path):
    config = TrainConfig(epochs=2, batch_size=16, log_every=100)
    trainer = Trainer(Distiller(mlp(), None, ["ce"]), toy_splits(nan=True), config, device="cpu", run_dir=tmp_path)
    with pytest.raises(TrainingDiverged, match="at steps 1-3 "):
        trainer.fit(stop_after_steps=3)
    assert not (tmp_path / "checkpoints").exists()


def test_a_term_going_nan_mid_run_is_named_and_the_last_good_checkpoint_is_kept(tmp_path):
    teacher = nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 4))
    student = mlp()
    distiller = Distiller(student, teacher, ["ce", "kd"])
    config = TrainConfig(epochs=3, batch_size=16, log_every=5)  # 6 steps per epoch: reads at 5, 6, 10, ...
    trainer = Trainer(distiller, toy_splits(), config, device="cpu", run_dir=tmp_path)
    # from the forward of step 9 on, the teacher's logits are NaN: KD goes NaN, CE stays finite
    teacher.register_forward_hook(lambda module, args, out: out * float("nan") if trainer.step >= 8 else out)
    last = tmp_path / "checkpoints" / "last.pt"
    with pytest.raises(TrainingDiverged) as error:
        trainer.fit()
    assert str(error.value) == (
        f"training diverged: loss term 'kd' is nan at steps 7-10 (last good checkpoint: {last}); lower the learning "
        "rate or check the inputs for NaN"
    )
    assert load_checkpoint(last)["step"] == 6  # written at epoch 1's evaluation; nothing after the divergence
    assert all(p.isfinite().all() for p in student.parameters())  # NaN gradients were never applied


@pytest.mark.parametrize("grad_clip", [None, 5.0])
def test_a_non_finite_gradient_with_a_finite_loss_stops_the_run(tmp_path, grad_clip):
    student = mlp()
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    student[0].weight.register_hook(lambda grad: grad * float("inf"))  # inf · 0 = NaN among the infinities
    config = TrainConfig(epochs=1, batch_size=16, log_every=2, grad_clip=grad_clip)
    trainer = Trainer(Distiller(student, None, ["ce"]), toy_splits(), config, device="cpu")
    with pytest.raises(TrainingDiverged, match=r"the gradient norm is NaN or infinite in 2 step\(s\) .* at steps 1-2 "):
        trainer.fit()
    assert all(torch.equal(initial[k], v) for k, v in student.state_dict().items())


def test_finite_training_is_not_flagged():
    config = TrainConfig(epochs=1, batch_size=16, log_every=2, grad_clip=1.0)
    summary = Trainer(Distiller(mlp(), None, ["ce"]), toy_splits(), config, device="cpu").fit()
    assert summary["steps"] == 6


def test_a_batch_that_does_not_split_evenly_over_the_processes_is_refused(monkeypatch):
    # CRD gathers every rank's slice of the batch (equal shapes), and DDP's mean of means is the batch mean only then
    monkeypatch.setattr(trainer_module, "world_size", lambda: 3)
    with pytest.raises(ValueError, match=r"^train.batch_size=16 does not split evenly over 3 processes: use a mult"):
        Trainer(Distiller(mlp(), None, ["ce"]), toy_splits(), TrainConfig(batch_size=16), device="cpu")


# -- item 4: a checkpoint of another model -------------------------------------------------------------------------
def test_rebuilding_a_run_from_a_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    def config(hidden: int):
        return build_config({"name": "toy", "output_dir": str(tmp_path), "methods": [{"name": "ce"}],
                             "student": {"name": "mlp", "kwargs": {"hidden": [hidden]}}})

    splits, checkpoints = toy_splits(), tmp_path / "checkpoints"
    checkpoints.mkdir()
    torch.manual_seed(1)
    saved = Distiller(build_student(config(16).student, splits), None, ["ce"])
    torch.save({"distiller": saved.training_state_dict()}, checkpoints / "right.pt")
    rebuilt = rebuild_distiller(tmp_path, config(16), splits, "right").training_state_dict()
    assert all(torch.equal(rebuilt[k], v) for k, v in saved.training_state_dict().items())
    # the bare model's state (no "student." prefix), a likely mix-up: it used to load nothing, silently
    torch.save({"distiller": saved.student.state_dict()}, checkpoints / "bare.pt")
    with pytest.raises(CheckpointError, match=r"^checkpoint '.*bare.pt' does not fit the distiller: .* missing from "
                                              r"the file \(e.g. \['student\..* unknown to it \(e.g. \['features\."):
        rebuild_distiller(tmp_path, config(16), splits, "bare")
    # a student of another width: one line naming the key and both shapes (it was a multi-line RuntimeError)
    narrow = Distiller(build_student(config(8).student, splits), None, ["ce"])
    torch.save({"distiller": narrow.training_state_dict()}, checkpoints / "narrow.pt")
    with pytest.raises(CheckpointError, match=r"'student\.\S+' is \(8, 40\) in the file but \(16, 40\) in the model"):
        rebuild_distiller(tmp_path, config(16), splits, "narrow")


def test_a_resume_with_a_checkpoint_of_another_model_leaves_the_run_config_as_it_was(tmp_path):
    def config(hidden: int):
        return build_config({"name": "toy", "output_dir": str(tmp_path), "methods": [{"name": "ce"}],
                             "student": {"name": "mlp", "kwargs": {"hidden": [hidden]}},
                             "train": {"epochs": 2, "batch_size": 32}})

    splits, run_dir = toy_splits(), tmp_path / "run"
    train(config(16), run_dir=run_dir, splits=splits, stop_after_steps=3)
    written = (run_dir / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match="last.pt"):
        train(config(8), run_dir=run_dir, splits=splits, resume=True)
    assert (run_dir / "config.yaml").read_text() == written  # it used to be replaced by the wider model's config
    summary = train(config(16), run_dir=run_dir, splits=splits, resume=True)  # the right config still resumes
    assert summary["steps"] == 2 * (96 // 32)
