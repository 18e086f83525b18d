import copy
import math

import pytest
import torch
import torch.nn.functional as F

from fisherkd.config import ScheduleConfig, TrainConfig, build_config
from fisherkd.data import ArrayDataset, DataSplits, make_loader
from fisherkd.distiller import Distiller
from fisherkd.engine import Trainer, load_checkpoint
from fisherkd.engine.schedule import lr_factor, lr_factor_tensor
from fisherkd.errors import CheckpointError
from fisherkd.run import train
from fisherkd.tracking import read_metrics
from helpers import forbid_host_reads


def toy_splits(n: int = 96, seed: int = 0) -> DataSplits:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 32, 40, generator=g)
    y = (x[:, :10].sum(1) > 0).long() + 2 * (x[:, 10:20].sum(1) > 0).long()
    return DataSplits("toy", ArrayDataset(x[:n], y[:n]), ArrayDataset(x[n:], y[n:]), 4, (40,))


def toy_config(tmp_path, **train) -> dict:
    return {
        "name": "toy",
        "output_dir": str(tmp_path / "runs"),
        "teacher": {"name": "cnn1d", "train": {"epochs": 2, "batch_size": 32, "log_every": 1}},
        "student": {"name": "mlp", "kwargs": {"hidden": [16]}},
        "methods": [
            {"name": "ce", "weight": 0.1},
            {"name": "kd", "weight": 0.9},
            {"name": "fitnet", "weight": 1.0, "pairs": [["features", "features"]]},
        ],
        "train": {
            "epochs": 3, "batch_size": 16, "log_every": 1,
            "optimizer": {"name": "sgd", "lr": 0.05},
            "schedule": {"name": "cosine", "warmup_epochs": 1},
            "augment": {"noise": 0.1, "mixup_alpha": 0.5, "crop_padding": 2},
            **train,
        },
    }


def step_losses(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path / "cache"))
    splits = toy_splits()
    config = build_config(toy_config(tmp_path))
    full = train(config, run_dir=tmp_path / "full", splits=splits)
    # stop mid-epoch 2 (steps_per_epoch = 6), then resume in the same directory
    stopped = train(config, run_dir=tmp_path / "cut", splits=splits, stop_after_steps=8)
    assert stopped == {"stopped_at_step": 8}
    resumed = train(config, run_dir=tmp_path / "cut", splits=splits, resume=True)
    expected, got = step_losses(tmp_path / "full"), step_losses(tmp_path / "cut")
    assert [s for s, _ in got] == list(range(1, 19))
    assert got == expected  # bit-identical losses at every step
    assert resumed["test_accuracy"] == full["test_accuracy"]
    weights_full = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["distiller"]
    weights_cut = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["distiller"]
    assert all(torch.equal(weights_full[k], weights_cut[k]) for k in weights_full)


def test_run_directory_contents_and_atomic_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path / "cache"))
    summary = train(build_config(toy_config(tmp_path, epochs=1)), splits=toy_splits())
    run_dir = tmp_path / "runs" / "toy"
    for name in ["config.yaml", "metrics.jsonl", "metrics.csv", "summary.json", "plots/curves.png",
                 "checkpoints/last.pt", "checkpoints/best.pt"]:
        assert (run_dir / name).exists(), name
    assert not list(run_dir.rglob("*.tmp*"))
    assert {"test_accuracy", "test_agreement", "test_kl", "test_ece", "teacher"} <= set(summary)
    # a second run with the same name never overwrites the first
    train(build_config(toy_config(tmp_path, epochs=1)), splits=toy_splits())
    assert (tmp_path / "runs" / "toy_1" / "summary.json").exists()


def test_teacher_is_trained_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path / "cache"))
    config = build_config(toy_config(tmp_path, epochs=1))
    first = train(config, splits=toy_splits())
    second = train(config, splits=toy_splits())
    assert first["teacher"]["source"] == "trained" and second["teacher"]["source"] == "cache"
    assert first["test_teacher_accuracy"] == second["test_teacher_accuracy"]
    assert len(list((tmp_path / "cache" / "teachers").glob("*.pt"))) == 1


def test_gradient_accumulation_matches_the_full_batch():
    splits = toy_splits(n=64)

    def one_epoch(batch_size: int, accum: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        student = torch.nn.Sequential(torch.nn.Linear(40, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
        config = TrainConfig(
            epochs=1, batch_size=batch_size, grad_accum=accum, optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.0,
                                                                            "weight_decay": 0.0},
            schedule={"name": "constant"},
        )
        trainer = Trainer(Distiller(student, None, ["ce"]), splits, config)
        trainer.loader.shuffle = False
        trainer.fit()
        return student.state_dict()

    full, accumulated = one_epoch(32, 1), one_epoch(16, 2)
    assert all(torch.allclose(full[k], accumulated[k], atol=1e-6) for k in full)


def test_schedules_match_hand_computed_values():
    cosine = ScheduleConfig(name="cosine", warmup_epochs=1)
    # 10 steps per epoch, 100 in total: warm-up over the first 10
    assert lr_factor(0, 10, 100, cosine) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, cosine) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, cosine) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    step = ScheduleConfig(name="step", milestones=[3, 6], gamma=0.1)
    assert [lr_factor(s, 10, 100, step) for s in (29, 30, 59, 60)] == pytest.approx([1.0, 0.1, 0.1, 0.01])
    assert lr_factor(77, 10, 100, ScheduleConfig(name="constant")) == 1.0


SCHEDULES = [
    ScheduleConfig(name="cosine", warmup_epochs=1.5),
    ScheduleConfig(name="cosine"),
    ScheduleConfig(name="step", milestones=[2, 4], gamma=0.1, warmup_epochs=1),
    ScheduleConfig(name="constant", warmup_epochs=0.5),
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: f"{s.name}-warmup{s.warmup_epochs}")
def test_the_device_schedule_matches_the_host_schedule_at_every_step(schedule):
    # 10 steps per epoch, 60 in all, and a few past the end (cosine stays at zero)
    got = lr_factor_tensor(torch.arange(70), 10, 60, schedule)
    expected = torch.tensor([lr_factor(s, 10, 60, schedule) for s in range(70)], dtype=torch.float64)
    assert torch.allclose(got.double(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("optimizer", [
    {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True},
    {"name": "adamw", "lr": 0.01, "weight_decay": 0.01},
])
def test_the_device_learning_rate_trains_as_a_host_scheduler_does(optimizer):
    # The engine keeps lr on the device and steps fused optimizers with it; the reference is the textbook loop:
    # a float lr moved by LambdaLR on the host, PyTorch's default (foreach) optimizer, the same batches.
    splits, schedule = toy_splits(), ScheduleConfig(name="cosine", warmup_epochs=1)
    config = TrainConfig(epochs=3, batch_size=16, optimizer=optimizer, schedule=schedule, log_every=100)
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(40, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    reference = copy.deepcopy(student)
    Trainer(Distiller(student, None, ["ce"]), splits, config, device="cpu", seed=3).fit()

    if optimizer["name"] == "sgd":
        opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    else:
        opt = torch.optim.AdamW(reference.parameters(), lr=0.01, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 6, 18, schedule))
    loader = make_loader(splits, "train", 16, shuffle=True, seed=3)
    for epoch in range(3):
        for batch in loader.epoch(epoch):
            opt.zero_grad()
            F.cross_entropy(reference(batch.x), batch.y).backward()
            opt.step()
            scheduler.step()
    for (name, got), want in zip(student.state_dict().items(), reference.state_dict().values()):
        assert torch.allclose(got, want, atol=1e-6), name


def test_the_training_step_reads_nothing_on_the_host(monkeypatch):
    # What a captured step needs: between two log intervals nothing leaves the device (no .item(), no bool of a
    # tensor), with a schedule, augmentation, a memory-bank method and Fisher weights in the step.
    torch.manual_seed(0)  # unseeded, some initialisations made FitNet diverge at lr 0.05, which now stops the run
    splits = toy_splits()
    teacher = torch.nn.Sequential(torch.nn.Linear(40, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    student = torch.nn.Sequential(torch.nn.Linear(40, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    methods = [
        {"name": "ce", "weight": 0.1},
        {"name": "kd", "fisher": {"axis": "sample"}},
        {"name": "crd", "pairs": [["1", "1"]], "num_data": 96, "nce_k": 32},
        {"name": "fitnet", "pairs": [["1", "1"]], "fisher": {"axis": "channel", "every": 2}},
    ]
    distiller = Distiller(student, teacher, methods, splits.train.x[:2])
    config = TrainConfig(epochs=2, batch_size=16, log_every=100, eval_every=100, schedule={"warmup_epochs": 1},
                         augment={"noise": 0.1, "mixup_alpha": 0.5}, optimizer={"name": "sgd", "lr": 0.01})
    trainer = Trainer(distiller, splits, config, device="cpu")
    steps = []

    def guarded(method):
        def run(*args, **kwargs):  # logging and evaluation may read; the step between them may not
            monkeypatch.undo()
            try:
                return method(*args, **kwargs)
            finally:
                steps.append(trainer.step)
                forbid_host_reads(monkeypatch)
        return run

    trainer._log_train = guarded(trainer._log_train)
    trainer._end_of_epoch = guarded(trainer._end_of_epoch)
    # the first step may look once at state it keeps on the device from then on (CRD's normaliser)
    trainer.fit(stop_after_steps=1)
    guarded(lambda: None)()
    summary = trainer.fit()
    monkeypatch.undo()
    assert summary["steps"] == 12 and steps[-1] == 12


def test_too_large_a_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="batch_size=64 × grad_accum=4 exceeds the 96"):
        Trainer(Distiller(torch.nn.Linear(40, 4), None, ["ce"]), toy_splits(), TrainConfig(batch_size=64, grad_accum=4))


def test_checkpoints_load_with_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"holds Python objects \(print\)"):
        load_checkpoint(tmp_path / "evil.pt")
