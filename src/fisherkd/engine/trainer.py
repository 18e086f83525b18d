"""The training loop. It knows nothing of individual methods: it calls the Distiller and minimises ``loss``."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fisherkd.config import TrainConfig
from fisherkd.core import UNLABELLED, model_logits
from fisherkd.data import DataSplits, FolderSplits, augment, make_loader
from fisherkd.data.hard import HardAugmentation, disagreement
from fisherkd.distiller import Distiller
from fisherkd.engine.checkpoint import load_checkpoint, load_weights, rng_state, save_atomic, set_rng_state
from fisherkd.engine.distributed import all_reduce_sum, barrier, init_distributed, is_main, rank, world_size
from fisherkd.engine.schedule import lr_factor, lr_factor_tensor
from fisherkd.errors import CheckpointError
from fisherkd.fisher import mark_mixed_inputs
from fisherkd.metrics import FidelityMeter
from fisherkd.tracking import Tracker


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    """Seed torch's CPU and CUDA generators (all FisherKD randomness comes from them)."""
    torch.manual_seed(seed)


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    enabled = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def make_optimizer(params: list[nn.Parameter], config: TrainConfig, lr: float | torch.Tensor) -> torch.optim.Optimizer:
    """The configured optimizer. A tensor ``lr`` (on the parameters' device) is read by the optimizer step itself,
    which then needs no host value: the fused kernels of SGD, Adam and AdamW take it on CPU and CUDA."""
    opt = config.optimizer
    fused = isinstance(lr, torch.Tensor)
    if opt.name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=opt.momentum, nesterov=opt.nesterov, weight_decay=opt.weight_decay, fused=fused
        )
    cls = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=opt.weight_decay, fused=fused)


class TrainingDiverged(RuntimeError):
    """A loss term or the gradient norm became NaN or infinite. Raised at the metrics read that first sees it,
    before any checkpoint is written, so the last checkpoint on disk is the last good one."""


def load_distiller_state(distiller: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load a checkpoint's distiller state (resume, evaluation, reports, export), refusing in one line one written
    for another model or config. A frozen teacher is not checkpointed (it comes from its own checkpoint or the
    cache), and the clock's step is set from the checkpoint's ``step`` (runs from before the clock lack it)."""
    load_weights(distiller, state, path, "distiller", optional=("teacher.", "clock."))


NONFINITE_GRAD = "nonfinite_grad_steps"  # a metric sum: steps whose gradient norm was NaN or infinite


def divergence(values: dict[str, float], loss_keys: dict[str, None]) -> str | None:
    """What went non-finite in an interval's metric sums (a NaN or inf in any step stays in the sum), or None."""
    terms = [k for k in loss_keys if k != "loss" and not math.isfinite(values[k])]
    if len(terms) == 1:
        return f"loss term {terms[0]!r} is {values[terms[0]]}"
    if terms:
        return "loss terms " + ", ".join(f"{k!r} ({values[k]})" for k in terms) + " are not finite"
    if "loss" in loss_keys and not math.isfinite(values["loss"]):
        return f"the total loss is {values['loss']}"
    if skipped := values.get(NONFINITE_GRAD):
        return f"the gradient norm is NaN or infinite in {skipped:.0f} step(s) (their updates were skipped)"
    return None


@torch.no_grad()
def evaluate(
    distiller: Distiller, splits: DataSplits | FolderSplits, batch_size: int = 1000, amp: str = "auto"
) -> dict[str, float]:
    """Test-split student accuracy, ECE and, with a teacher, agreement, KL(p_t‖p_s) at τ=1 and error inheritance."""
    was_training = distiller.training
    distiller.eval()
    device = next(distiller.student.parameters()).device
    meter = FidelityMeter()
    predictor = distiller.inference_model()  # the student, or what a method built around it (SimKD)
    loader = make_loader(splits, "test", batch_size, shuffle=False, drop_last=False, device=device)
    with autocast(device, amp):
        for batch in loader.epoch(0):
            student_logits = model_logits(predictor(batch.x))
            teacher_logits = distiller.teacher_forward(batch.x) if distiller.teacher is not None else None
            meter.update(student_logits, batch.y, teacher_logits)
    distiller.train(was_training)
    return meter.compute()


class Trainer:
    """Trains a :class:`Distiller` on :class:`DataSplits` with one :class:`TrainConfig`.

    Metrics are summed on the device and read once every ``log_every`` optimizer steps. With a ``run_dir``,
    checkpoints ``last.pt`` and ``best.pt`` are written atomically at every evaluation, and ``fit(resume=True)``
    continues from ``last.pt`` exactly: same batches, same augmentation draws, same losses.
    """

    def __init__(
        self,
        distiller: Distiller,
        splits: DataSplits | FolderSplits,
        config: TrainConfig,
        *,
        device: str | torch.device = "auto",
        seed: int = 0,
        run_dir: str | Path | None = None,
        tracker: Tracker | None = None,
        progress: Progress | None = None,
        label: str = "train",
    ) -> None:
        self.config = config
        self.device = resolve_device(device)
        self.distiller = distiller.to(self.device)
        mark_mixed_inputs(self.distiller, bool(config.augment.mixup_alpha))  # for fisher.mixed: off
        self.splits = splits
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.tracker = tracker
        self.label = label
        self._progress = progress
        self.channels_last = config.channels_last if config.channels_last is not None else self.device.type == "cuda"
        self.channels_last = self.channels_last and len(splits.input_shape) == 3
        if self.channels_last:
            self.distiller.to(memory_format=torch.channels_last)
        if config.compile:
            self.distiller.student.compile()
        if isinstance(splits, DataSplits) and splits.has_unlabelled:
            refused = [s.name for s, m in zip(distiller.specs, distiller.methods) if m.needs_target and
                       not m.accepts_unlabelled]
            if refused:
                raise ValueError(
                    f"method {refused[0]!r} needs a label for every sample, but the training split has transfer inputs "
                    "without one (data.labelled / data.transfer): use methods that read the teacher (kd, hints) and "
                    "'ce', which leaves them out"
                )
        distributed = init_distributed()
        if config.batch_size % world_size():  # every rank must hold an equal slice of each global batch
            raise ValueError(
                f"train.batch_size={config.batch_size} does not split evenly over {world_size()} processes: use a "
                f"multiple of {world_size()}"
            )
        self.loader = make_loader(
            splits, "train", config.batch_size, shuffle=True, seed=seed, device=self.device,
            rank=rank(), world_size=world_size(),
        )
        # DDP averages gradients over ranks; the teacher's frozen parameters are not part of it.
        self.model: nn.Module = DistributedDataParallel(self.distiller) if distributed else self.distiller
        self.steps_per_epoch = len(self.loader) // config.grad_accum
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"train.batch_size={config.batch_size} × grad_accum={config.grad_accum} exceeds the "
                f"{len(splits.train)} training samples: lower one of them"
            )
        self.total_steps = self.steps_per_epoch * config.epochs
        # The step counter and the learning rate live on the device and are advanced inside the step: no host
        # value enters it, so it can be captured whole (a CUDA graph) and still follow the schedule.
        self.step = 0
        self.distiller.clock.configure(self.steps_per_epoch)
        self.step_tensor = self.distiller.clock.step  # advanced by distiller.after_optimizer_step()
        self.lr = torch.zeros((), device=self.device)
        self.optimizer = make_optimizer(distiller.trainable_parameters(), config, self.lr)
        self._set_lr()
        self.hard: HardAugmentation | None = None  # HARD's augmenter, trained here against the student's optimizer
        if config.augment.hard is not None:
            if distiller.teacher is None:
                raise ValueError(
                    "train.augment.hard learns inputs where teacher and student disagree, but the distiller has no "
                    "teacher: add one, or remove augment.hard"
                )
            self.hard = HardAugmentation(config.augment.hard, tuple(splits.input_shape), self.device)
        self.best_accuracy = -1.0
        self.history: list[dict[str, Any]] = []
        self._loss_keys: dict[str, None] = {}  # the metric sums that are losses (in order), checked for divergence
        self._read_step = 0

    # -- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "distiller": self.distiller.training_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "best_accuracy": self.best_accuracy,
            "rng": rng_state(),
            **({"hard": self.hard.state_dict()} if self.hard is not None else {}),
        }

    def save(self, name: str) -> None:
        if self.run_dir is not None and is_main():
            save_atomic(self.state_dict(), self.run_dir / "checkpoints" / f"{name}.pt")
        barrier()  # nobody reads a checkpoint before rank 0 has renamed it into place

    def load(self, path: str | Path) -> None:
        state = load_checkpoint(path, self.device, keys=("distiller", "optimizer", "step"))
        load_distiller_state(self.distiller, state["distiller"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.step_tensor.fill_(self.step)
        for group in self.optimizer.param_groups:  # loading replaced the shared rate with the saved copy
            group["lr"] = self.lr
        self._set_lr()
        self.best_accuracy = state["best_accuracy"]
        if (self.hard is None) != ("hard" not in state):
            has = "has a" if "hard" in state else "has no"
            raise CheckpointError(
                f"checkpoint {str(path)!r} {has} HARD augmenter but train.augment.hard is "
                f"{'off' if self.hard is None else 'on'}: resume with the config the run was started with"
            )
        if self.hard is not None:
            self.hard.load_state_dict(state["hard"])
        set_rng_state(state["rng"])

    def _set_lr(self) -> None:
        base = self.config.optimizer.lr
        schedule = lr_factor_tensor(self.step_tensor, self.steps_per_epoch, self.total_steps, self.config.schedule)
        self.lr.copy_(base * schedule)

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (computed on the host, for logging)."""
        return self.config.optimizer.lr * lr_factor(step, self.steps_per_epoch, self.total_steps, self.config.schedule)

    # -- training ------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False, stop_after_steps: int | None = None) -> dict[str, Any]:
        """Train to the configured number of epochs (or stop early after ``stop_after_steps`` optimizer steps,
        with a checkpoint, as an interrupted run would). Returns the summary, also written to summary.json."""
        if resume:
            if self.run_dir is None:
                raise ValueError("resume needs a run_dir holding checkpoints/last.pt")
            self.load(self.run_dir / "checkpoints" / "last.pt")
            self._drop_rows_after_checkpoint()
        config, accum = self.config, self.config.grad_accum
        sums: dict[str, torch.Tensor] = {}  # device-side, added to in place and zeroed after each log
        self._read_step = self.step  # the last step whose metrics were read
        batches = 0
        started = time.perf_counter()
        own_progress = self._progress is None
        progress = self._progress or make_progress()
        task = progress.add_task(self.label, total=self.total_steps, completed=self.step, info="")
        self.distiller.train()
        with progress if own_progress else contextlib.nullcontext():
            while self.step < self.total_steps:
                epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)
                for i, batch in enumerate(self.loader.epoch(epoch, start=step_in_epoch * accum)):
                    if i // accum >= self.steps_per_epoch - step_in_epoch:
                        break  # a partial accumulation group at the end of the epoch is dropped
                    x, y = augment(batch.x, batch.y, config.augment)
                    if self.hard is not None:
                        x = self._hard_augment(x, update=i % accum == 0)
                    if self.channels_last and x.dim() == 4:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with autocast(self.device, config.amp):
                        out = self.model(x, y, index=batch.index)
                    (out.loss / accum).backward()
                    correct = ("correct", (out.logits.argmax(-1) == y).sum())
                    labelled = ("labelled", (y != UNLABELLED).sum())  # transfer inputs have no label to be right on
                    extra = [("hard_kl", self._hard_kl(out))] if self.hard is not None else []
                    for key, value in [("loss", out.loss), *out.losses.items(), *out.stats.items(), correct, labelled,
                                       *extra]:
                        if key not in sums:
                            sums[key] = torch.zeros((), device=self.device)
                            if key == "loss" or key in out.losses:
                                self._loss_keys[key] = None
                        sums[key].add_(value.detach().float())
                    batches += 1
                    if (i + 1) % accum:
                        continue
                    self._optimizer_step(sums)
                    self.optimizer.zero_grad(set_to_none=True)
                    self.distiller.after_optimizer_step()
                    self._set_lr()
                    self.step += 1
                    if self.step % config.log_every == 0 or self.step % self.steps_per_epoch == 0:
                        self._log_train(sums, batches, progress, task)
                        batches = 0
                        for total in sums.values():
                            total.zero_()
                    epoch_done = self.step % self.steps_per_epoch == 0
                    if epoch_done:  # evaluated (and checkpointed) before a stop at the same step
                        self._end_of_epoch(self.step // self.steps_per_epoch, progress, task)
                    if stop_after_steps is not None and self.step >= stop_after_steps:
                        if batches:  # steps not read yet: a diverged state must not become the checkpoint
                            self._read_metrics(sums, batches)
                        self.save("last")
                        return {"stopped_at_step": self.step}
                    if epoch_done:
                        break
        return self._finish(time.perf_counter() - started)

    def _hard_augment(self, x: torch.Tensor, update: bool) -> torch.Tensor:
        """HARD: every ``every`` optimizer steps (on the step's first micro-batch) one ascent step of the augmenter
        on this batch, taps paused so the extra passes leave the distiller's captures alone; then the batch the
        teacher and the student train on, warped by the augmenter."""
        assert self.hard is not None
        if update and self.step % self.hard.config.every == 0:
            taps = [t for t in (self.distiller.student_taps, self.distiller.teacher_taps) if t is not None]
            with contextlib.ExitStack() as paused:
                for t in taps:
                    paused.enter_context(t.paused())
                self.hard.update(
                    self.distiller.teacher, self.distiller.student, x, lambda: autocast(self.device, self.config.amp)
                )
        return self.hard(x)

    def _hard_kl(self, out: Any) -> torch.Tensor:
        """The teacher-student KL on the augmented batch (logged as hard_kl: what the augmenter pushes up)."""
        assert self.hard is not None and out.teacher_logits is not None
        return disagreement(out.logits.detach(), out.teacher_logits, self.hard.config.temperature)

    def _optimizer_step(self, sums: dict[str, torch.Tensor]) -> None:
        """Clip, then step unless the gradient norm is NaN or infinite. The check stays on the device: the fused
        optimizers skip their update when ``found_inf`` is non-zero (as under a GradScaler), and the count of
        skipped steps joins the metric sums, read at the next log. Parts written in the forward pass (batch-norm
        statistics, memory banks) are not protected, but the run stops at that read, before any checkpoint."""
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self.config.grad_clip:
            finite = nn.utils.clip_grad_norm_(params, self.config.grad_clip).isfinite()
        elif params:  # per-tensor norms: one pass over the gradients, no host read
            finite = torch.stack(torch._foreach_norm([p.grad for p in params])).isfinite().all()
        else:
            finite = torch.ones((), dtype=torch.bool, device=self.device)
        bad = (~finite).float()
        if getattr(self.optimizer, "_step_supports_amp_scaling", False):  # the fused kernels read it
            self.optimizer.found_inf = bad
        if NONFINITE_GRAD not in sums:
            sums[NONFINITE_GRAD] = torch.zeros((), device=self.device)
        sums[NONFINITE_GRAD].add_(bad)
        self.optimizer.step()

    def _read_metrics(self, sums: dict[str, torch.Tensor], batches: int) -> tuple[dict[str, float], float]:
        """Sum the interval's metrics over ranks and read them (the one sync of the interval); raise
        :class:`TrainingDiverged` if a loss term or the gradient norm went non-finite since the last read."""
        counts = torch.tensor([batches], device=self.device, dtype=torch.float32)
        reduced = all_reduce_sum(torch.cat([torch.stack([v.float() for v in sums.values()]), counts]))
        *totals, batches = reduced.tolist()
        values = dict(zip(sums, totals))
        first, self._read_step = self._read_step + 1, self.step
        if problem := divergence(values, self._loss_keys):
            steps = f"step {self.step}" if first == self.step else f"steps {first}-{self.step}"
            last = self.run_dir / "checkpoints" / "last.pt" if self.run_dir is not None else None
            saved = f"last good checkpoint: {last}" if last is not None and last.exists() else "no checkpoint yet"
            raise TrainingDiverged(
                f"training diverged: {problem} at {steps} ({saved}); lower the learning rate or check the inputs "
                "for NaN"
            )
        return values, batches

    def _log_train(self, sums: dict[str, torch.Tensor], batches: int, progress: Progress, task: int):
        values, batches = self._read_metrics(sums, batches)
        row = {k: v / batches for k, v in values.items() if k not in ("correct", "labelled", NONFINITE_GRAD)}
        row["train_accuracy"] = values["correct"] / max(values["labelled"], 1.0)
        row["lr"] = self.lr_at(self.step)  # the rate of the next step, as schedulers report it
        if self.tracker is not None:
            self.tracker.log(self.step, row, "train")
        info = f"loss {row['loss']:.4f}  train acc {row['train_accuracy']:.3f}"
        progress.update(task, completed=self.step, info=info)

    def _end_of_epoch(self, epoch: int, progress: Progress, task: int) -> None:
        last = epoch == self.config.epochs
        if epoch % self.config.eval_every and not last:
            return
        metrics = evaluate(self.distiller, self.splits, self.config.eval_batch_size, self.config.amp)
        metrics["epoch"] = epoch
        self.history.append(metrics)
        if self.tracker is not None:
            self.tracker.log(self.step, metrics, "test")
        progress.update(task, info=f"test acc {metrics['accuracy']:.3f}")
        improved = metrics["accuracy"] > self.best_accuracy
        if improved:  # before last.pt is written: a resume from it must know the true best, or a worse model
            self.best_accuracy = metrics["accuracy"]  # could replace best.pt
        self.save("last")
        if improved:
            self.save("best")

    def _finish(self, seconds: float) -> dict[str, Any]:
        final = self.history[-1] if self.history else evaluate(self.distiller, self.splits)
        summary = {
            **{f"test_{k}": v for k, v in final.items() if k != "epoch"},
            "best_test_accuracy": self.best_accuracy,
            "steps": self.step,
            "train_seconds": seconds,
            "device": str(self.device),
        }
        if self.run_dir is not None and is_main():
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _drop_rows_after_checkpoint(self) -> None:
        # rows logged after the checkpoint belong to steps that will be run again
        if self.tracker is None:
            return
        rows = self.tracker.truncate(self.step)
        tests = [r for r in rows if r["split"] == "test"]
        self.history = [{k: v for k, v in r.items() if k not in ("step", "split")} for r in tests]


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        transient=False,
        disable=not is_main(),
    )
