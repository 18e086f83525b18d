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

from fisherkd.config import DataConfig, ModelConfig, RunConfig, StudentConfig, TeacherConfig, load_run_config
from fisherkd.data import DataSplits, FolderSplits, load_splits, make_loader
from fisherkd.distiller import Distiller
from fisherkd.engine.checkpoint import load_checkpoint, load_weights, save_atomic
from fisherkd.engine.distributed import barrier, init_distributed, is_main
from fisherkd.engine.trainer import Trainer, evaluate, load_distiller_state, resolve_device, seed_everything
from fisherkd.errors import UserError
from fisherkd.models import create_model
from fisherkd.paths import cache_dir
from fisherkd.prune import Pruned, prune
from fisherkd.schemes import EMATeacher, EnsembleTeacher, add_dual_head, load_student_weights
from fisherkd.tracking import Tracker


def build_model(config: ModelConfig, splits: DataSplits | FolderSplits) -> nn.Module:
    model = create_model(config.name, in_channels=splits.in_channels, num_classes=splits.num_classes, **config.kwargs)
    check_inputs(model, config, splits)
    if config.checkpoint:
        load_weights(model, load_student_weights(config.checkpoint), config.checkpoint, f"model {config.name!r}")
    return model


def check_inputs(model: nn.Module, config: ModelConfig, splits: DataSplits | FolderSplits) -> None:
    """Refuse, in one line, a model that cannot take the data's inputs (a common config slip), rather than fail
    with a matrix-shape error in the first training step."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, *splits.input_shape))
    except RuntimeError as err:
        raise UserError(
            f"model {config.name!r} cannot take this data's inputs, {splits.input_shape} per sample "
            f"({str(err).splitlines()[0]}): set its kwargs to fit the data, or choose another model"
        ) from err
    finally:
        model.train(was_training)


def build_student(
    config: StudentConfig, splits: DataSplits | FolderSplits, teacher: nn.Module | None = None
) -> nn.Module:
    """The student of ``config``; with ``from_teacher``, ``teacher`` pruned (see :func:`prune_teacher`)."""
    if config.from_teacher is not None:
        if teacher is None or config.name is None:
            raise ValueError("student.from_teacher: pass the teacher (teacher=) and set the student's name to its name")
        student = prune_teacher(config, teacher, splits).model
    else:
        student = build_model(config, splits)
    return add_dual_head(student, config.dual_head) if config.dual_head else student


def prune_teacher(config: StudentConfig, teacher: nn.Module, splits: DataSplits | FolderSplits) -> Pruned:
    """``teacher`` (a zoo model, its name and kwargs in ``config``) pruned by ``config.from_teacher`` on a seeded
    sample of the training split; ``config.name`` and ``config.kwargs`` are set to the pruned model's, so the
    resolved config rebuilds it (resume, evaluation and export load its weights from the run's checkpoints)."""
    spec = config.from_teacher
    assert spec is not None and config.name is not None
    arguments = spec.prune_arguments()
    batch, device = min(128, spec.calibration), next(teacher.parameters()).device
    loader = make_loader(splits, "train", batch, shuffle=True, drop_last=False, seed=arguments["seed"], device=device)
    batches, seen = [], 0
    for b in loader.epoch(0):
        batches.append((b.x, b.y))
        seen += len(b.y)
        if seen >= spec.calibration:
            break
    pruned = prune(
        teacher,
        batches,
        **arguments,
        name=config.name,
        kwargs=config.kwargs,
        in_channels=splits.in_channels,
        num_classes=splits.num_classes,
    )
    config.kwargs = pruned.kwargs
    return pruned


def pruned_student(
    config: RunConfig, teacher: nn.Module, splits: DataSplits | FolderSplits, run_dir: Path
) -> tuple[nn.Module, RunConfig]:
    """The student pruned from ``teacher``, and the run's config resolved to it: ``student.name`` / ``kwargs`` name
    the pruned zoo model and ``from_teacher`` is dropped, so resume, evaluation and export rebuild it like any zoo
    student (its weights then come from the run's checkpoints). ``config.yaml`` is rewritten so, and
    ``pruning.json`` records the pruning and the kept units."""
    assert config.teacher is not None and config.student.from_teacher is not None
    spec = config.student.from_teacher
    if spec.seed is None:  # each seed of a comparison then draws its own calibration sample, labels and random pick
        spec = spec.model_copy(update={"seed": config.seed})
    student_config = config.student.model_copy(
        update={"name": config.teacher.name, "kwargs": config.teacher.kwargs, "from_teacher": spec}
    )
    teacher.to(resolve_device(config.device))  # calibrate where the run trains
    student = build_student(student_config, splits, teacher)  # sets student_config.kwargs to the pruned model's
    resolved = config.model_copy(update={"student": student_config.model_copy(update={"from_teacher": None})})
    if is_main():
        write_config(resolved, run_dir)
        record = {"from_teacher": spec.model_dump(mode="json"), "teacher": config.teacher.name}
        record["kwargs"] = student_config.kwargs
        (run_dir / "pruning.json").write_text(json.dumps(record, indent=2))
    return student, resolved


# Fields that say how teachers are combined, not which model a teacher is: left out of a model's cache key, so an
# ensemble member shares its cache entry with the same teacher used alone.
SCHEME_FIELDS = {"members", "member_weights", "ensemble_average", "ensemble_weighting", "ema_decay"}


def teacher_data_key(data: DataConfig) -> dict[str, Any]:
    """The part of the data config that determines a teacher: not the transfer inputs (it never trains on them);
    ``labelled`` and ``class_groups`` only when set, so that teachers cached before those options keep their key."""
    key = data.model_dump(mode="json", exclude={"transfer"})
    for option in ("labelled", "class_groups"):
        if key[option] is None:
            del key[option]
    return key


def teacher_cache_path(config: TeacherConfig, data: dict[str, Any]) -> Path:
    """Teachers are keyed by everything that determines them: model, data, training recipe and seed. Options added
    after teachers were first cached (``train.mcmi``, ``train.augment.hard``) join the key only when set, so a
    teacher cached before them keeps its key and an MCMI teacher never collides with a plain one."""
    teacher = config.model_dump(mode="json", exclude=SCHEME_FIELDS)
    train = teacher["train"]
    for options, key in ((train, "mcmi"), (train["augment"], "hard")):
        if options.get(key) is None:
            options.pop(key, None)
    key = json.dumps({"teacher": teacher, "data": data}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "teachers" / f"{config.name}-{digest}.pt"


def get_teacher(
    config: RunConfig,
    splits: DataSplits | FolderSplits,
    progress: Progress | None = None,
    student: nn.Module | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The configured teacher and its record (test accuracy, where it came from).

    One model comes from its checkpoint, from the cache, or is trained now with CE and cached; an ensemble gets each
    member that way; an EMA teacher is a copy of ``student``. The global random state is left as it was, so the
    student's run does not depend on whether a teacher was trained or read from the cache.
    """
    teacher = config.teacher
    assert teacher is not None
    if teacher.ema_decay is not None:
        if student is None:
            raise ValueError("an EMA teacher (ema_decay) is a copy of the student: pass student=")
        return EMATeacher(student, teacher.ema_decay), {"source": "ema", "decay": teacher.ema_decay}
    with torch.random.fork_rng():
        if not teacher.members:
            return teacher_model(teacher, config, splits, progress)
        members, records = zip(*(teacher_model(m, config, splits, progress) for m in teacher.members))
    ensemble = EnsembleTeacher(
        members, teacher.member_weights, average=teacher.ensemble_average, weighting=teacher.ensemble_weighting
    )
    return ensemble, {"source": "ensemble", "members": list(records)}


def teacher_model(
    teacher: TeacherConfig, config: RunConfig, splits: DataSplits | FolderSplits, progress: Progress | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """One teacher model: from its checkpoint, from the cache, or trained now with CE (minus λ·CMI with
    ``train.mcmi``) and cached."""
    model = build_model(teacher, splits)
    if teacher.checkpoint:
        return model, {"source": teacher.checkpoint}
    path = teacher_cache_path(teacher, teacher_data_key(config.data))
    cached = path.exists()
    barrier()  # under DDP all ranks decide alike before rank 0 may write the cache
    if cached:
        state = load_checkpoint(path, keys=("model", "record"))
        load_weights(model, state["model"], path, f"teacher {teacher.name!r}")
        return model, {**state["record"], "source": "cache", "path": str(path)}
    seed_everything(teacher.seed)
    model = build_model(teacher, splits)
    mcmi = teacher.train.mcmi
    methods: list[Any] = ["ce"] + ([{"name": "mcmi", **mcmi.model_dump()}] if mcmi else [])
    trainer = Trainer(
        Distiller(model, None, methods),
        splits.labelled_only() if isinstance(splits, DataSplits) else splits,
        teacher.train,
        device=config.device,
        seed=teacher.seed,
        progress=progress,
        label=f"teacher {teacher.name}",
    )
    summary = trainer.fit()
    record = {"test_accuracy": summary["test_accuracy"], "train_seconds": summary["train_seconds"]}
    if is_main():
        save_atomic({"model": model.state_dict(), "record": record}, path)
    return model.cpu(), {**record, "source": "trained", "path": str(path)}


def write_config(config: RunConfig, run_dir: Path) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


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
    init_distributed()
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(config)
    barrier()  # every rank has chosen the same directory before rank 0 creates it
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:  # a resume writes it once its checkpoint is known to fit (below)
            write_config(config, run_dir)
    splits = splits or load_splits(config.data)
    seed_everything(config.seed)
    if config.student.from_teacher is not None:  # the student is the pruned teacher: the teacher comes first
        teacher, teacher_record = get_teacher(config, splits, progress)
        student, config = pruned_student(config, teacher, splits, run_dir)
    else:
        student = build_student(config.student, splits)
        teacher, teacher_record = get_teacher(config, splits, progress, student) if config.teacher else (None, {})
    device = resolve_device(config.device)
    example = next(iter(make_loader(splits, "test", 2, shuffle=False, device=device).epoch(0))).x
    distiller = Distiller(student.to(device), teacher.to(device) if teacher else None, config.methods, example)
    if resume:  # a checkpoint of another model is refused before the run's config.yaml is replaced
        path = run_dir / "checkpoints" / "last.pt"
        load_distiller_state(distiller, load_checkpoint(path, device, keys=("distiller",))["distiller"], path)
        if is_main():
            write_config(config, run_dir)
    tracker = Tracker(run_dir, config.tracking, config.model_dump(mode="json")) if is_main() else None
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
        if tracker is not None:
            tracker.close()
        distiller.close()
    if "stopped_at_step" not in summary and is_main():
        summary["teacher"] = teacher_record
        summary["run_dir"] = str(run_dir)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        from fisherkd.plots import plot_fisher_weights, plot_run

        plot_run(run_dir)
        if heatmaps := distiller.fisher_heatmaps():
            (run_dir / "fisher_weights.json").write_text(json.dumps({k: v.tolist() for k, v in heatmaps.items()}))
            plot_fisher_weights(heatmaps, run_dir / "plots" / "fisher_weights.png")
    return summary


def rebuild_distiller(
    run_dir: str | Path, config: RunConfig, splits: DataSplits | FolderSplits, checkpoint: str = "last"
) -> Distiller:
    """The Distiller of a run as its checkpoint left it (teacher from its checkpoint or the cache)."""
    student = build_student(config.student, splits)
    teacher = get_teacher(config, splits, student=student)[0] if config.teacher else None
    example = next(iter(make_loader(splits, "test", 2, shuffle=False).epoch(0))).x
    distiller = Distiller(student, teacher, config.methods, example)
    path = Path(run_dir) / "checkpoints" / f"{checkpoint}.pt"
    load_distiller_state(distiller, load_checkpoint(path, keys=("distiller",))["distiller"], path)
    return distiller


@torch.no_grad()
def evaluate_run(run_dir: str | Path, checkpoint: str = "last") -> dict[str, Any]:
    """Re-evaluate a finished or interrupted run from its resolved config and a checkpoint."""
    config = load_run_config(run_dir)
    splits = load_splits(config.data)
    distiller = rebuild_distiller(run_dir, config, splits, checkpoint).to(resolve_device(config.device))
    metrics = evaluate(distiller, splits, config.train.eval_batch_size, config.train.amp)
    distiller.close()
    return metrics
