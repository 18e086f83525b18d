"""One run from a config: data, a cached teacher, the student, the Distiller, the Trainer, the run directory."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.progress import Progress
from torch import nn

from fisherkd.config import ModelConfig, RunConfig, TeacherConfig
from fisherkd.data import DataSplits, FolderSplits, load_dataset, make_loader
from fisherkd.distiller import Distiller
from fisherkd.engine.checkpoint import load_checkpoint, save_atomic
from fisherkd.engine.trainer import Trainer, evaluate, resolve_device, seed_everything
from fisherkd.models import create_model
from fisherkd.paths import cache_dir
from fisherkd.tracking import Tracker


def build_model(config: ModelConfig, splits: DataSplits | FolderSplits) -> nn.Module:
    model = create_model(config.name, in_channels=splits.in_channels, num_classes=splits.num_classes, **config.kwargs)
    if config.checkpoint:
        state = load_checkpoint(config.checkpoint)
        model.load_state_dict(state.get("model", state))
    return model


def teacher_cache_path(config: TeacherConfig, data: dict[str, Any]) -> Path:
    """Teachers are keyed by everything that determines them: model, data, training recipe and seed."""
    key = json.dumps({"teacher": config.model_dump(mode="json"), "data": data}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "teachers" / f"{config.name}-{digest}.pt"


def get_teacher(
    config: RunConfig, splits: DataSplits | FolderSplits, progress: Progress | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The configured teacher: from its checkpoint, from the cache, or trained now with CE and cached.

    Returns the model and its record (test accuracy, whether it came from the cache).
    """
    assert config.teacher is not None
    teacher = build_model(config.teacher, splits)
    if config.teacher.checkpoint:
        return teacher, {"source": config.teacher.checkpoint}
    path = teacher_cache_path(config.teacher, config.data.model_dump(mode="json"))
    if path.exists():
        state = load_checkpoint(path)
        teacher.load_state_dict(state["model"])
        return teacher, {**state["record"], "source": "cache", "path": str(path)}
    seed_everything(config.teacher.seed)
    teacher = build_model(config.teacher, splits)
    trainer = Trainer(
        Distiller(teacher, None, ["ce"]),
        splits,
        config.teacher.train,
        device=config.device,
        seed=config.teacher.seed,
        progress=progress,
        label=f"teacher {config.teacher.name}",
    )
    summary = trainer.fit()
    record = {"test_accuracy": summary["test_accuracy"], "train_seconds": summary["train_seconds"]}
    save_atomic({"model": teacher.state_dict(), "record": record}, path)
    return teacher.cpu(), {**record, "source": "trained", "path": str(path)}


def new_run_dir(config: RunConfig) -> Path:
    """``output_dir/name``, or ``name_1``, ``name_2``, … when it exists: a run never overwrites another."""
    base = Path(config.output_dir) / config.name
    path, n = base, 0
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}_{n}")
    return path


def train(
    config: RunConfig,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    stop_after_steps: int | None = None,
    splits: DataSplits | FolderSplits | None = None,
) -> dict[str, Any]:
    """Train the student of ``config`` and return its summary. With ``resume``, ``run_dir`` must be given."""
    if resume and run_dir is None:
        raise ValueError("resume needs the run directory to continue")
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    splits = splits or load_dataset(config.data.name, config.data.root)
    teacher, teacher_record = get_teacher(config, splits, progress) if config.teacher else (None, {})
    seed_everything(config.seed)
    student = build_model(config.student, splits)
    device = resolve_device(config.device)
    example = next(iter(make_loader(splits, "test", 2, shuffle=False, device=device).epoch(0))).x
    distiller = Distiller(student.to(device), teacher.to(device) if teacher else None, config.methods, example)
    tracker = Tracker(run_dir, config.tracking, config.model_dump(mode="json"))
    trainer = Trainer(
        distiller,
        splits,
        config.train,
        device=device,
        seed=config.seed,
        run_dir=run_dir,
        tracker=tracker,
        progress=progress,
        label=config.name,
    )
    try:
        summary = trainer.fit(resume=resume, stop_after_steps=stop_after_steps)
    finally:
        tracker.close()
        distiller.close()
    if "stopped_at_step" not in summary:
        summary["teacher"] = teacher_record
        summary["run_dir"] = str(run_dir)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        from fisherkd.plots import plot_run

        plot_run(run_dir)
    return summary


@torch.no_grad()
def evaluate_run(run_dir: str | Path, checkpoint: str = "last") -> dict[str, Any]:
    """Re-evaluate a finished or interrupted run from its resolved config and a checkpoint."""
    run_dir = Path(run_dir)
    config = RunConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    splits = load_dataset(config.data.name, config.data.root)
    teacher = get_teacher(config, splits)[0] if config.teacher else None
    student = build_model(config.student, splits)
    example = next(iter(make_loader(splits, "test", 2, shuffle=False).epoch(0))).x
    distiller = Distiller(student, teacher, config.methods, example)
    state = load_checkpoint(run_dir / "checkpoints" / f"{checkpoint}.pt")
    distiller.load_state_dict(state["distiller"], strict=False)
    distiller.to(resolve_device(config.device))
    metrics = evaluate(distiller, splits, config.train.eval_batch_size, config.train.amp)
    distiller.close()
    return metrics
