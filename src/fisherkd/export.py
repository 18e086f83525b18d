"""``fisherkd export``: a finished run's student alone, in deployable formats, verified, with a model card.

A run's checkpoint holds the student mixed with adapters, method and Fisher state, loadable only by rebuilding the
run's config. :func:`export_run` writes the student alone:

- ``model.safetensors`` + ``student.json`` (``fisherkd.models.load_student(DIR)`` rebuilds it in one call),
- ``model.onnx`` (dynamic batch axis, checked with ``onnx.checker``; needs ``pip install 'fisherkd[export]'``),
- ``model.torchscript.pt`` (traced) where the model can be traced,

and verifies each format: its logits on a held-out test batch equal PyTorch's within :data:`ATOL` + :data:`RTOL`
(ONNX through ONNX Runtime), and its accuracy on the whole test split equals the run's within
:data:`ACCURACY_TOLERANCE`. A mismatch raises :class:`ExportError`. ``README.md`` beside them is a model card
(Hugging Face layout): teacher and student, data, recipe, fidelity metrics and measured latency, with the run's
plots. :func:`export_hf` does the same job for a student trained with ``DistillationTrainer``: ``save_pretrained``
in safetensors plus the tokenizer, checked by reloading.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from fisherkd.core import call_model, model_logits, nearest
from fisherkd.models.saved import (
    SPEC_FILE,
    WEIGHTS_FILE,
    load_student,
    predictor_spec,
    save_student,
    student_spec,
)
from fisherkd.provenance import provenance

FORMATS = ("safetensors", "onnx", "torchscript")
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
# float32 logits of the exported model vs PyTorch's: |exported − pytorch| ≤ ATOL + RTOL·|pytorch| elementwise
ATOL = 1e-4
RTOL = 1e-4
# Test accuracy of every format vs the run's record (fraction). The run may have evaluated under bf16 autocast on a
# GPU, which can flip a near-tie prediction that a float32 re-evaluation does not: allow 0.2 points, no more.
ACCURACY_TOLERANCE = 0.002
VERIFY_SAMPLES = 64
ONNX_MISSING = "ONNX export needs onnx and onnxruntime: pip install 'fisherkd[export]'"


class ExportError(ValueError):
    """An exported model that does not reproduce the run (a ValueError: the CLI prints it as one line)."""


Predict = Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------------------------------------- run dirs


def parse_formats(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"safetensors,onnx"`` → ``["safetensors", "onnx"]``; an unknown name is an error naming the nearest."""
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    for name in names:
        if name not in FORMATS:
            raise ValueError(f"unknown export format {name!r}; {nearest(name, FORMATS)}")
    if not names:
        raise ValueError(f"no export format given; choose from {', '.join(FORMATS)}")
    return list(dict.fromkeys(names))


def run_accuracy(summary: Mapping[str, Any], checkpoint: str) -> float | None:
    """The test accuracy the run recorded for ``checkpoint``: the final one for last.pt, the best for best.pt."""
    return summary.get("best_test_accuracy" if checkpoint == "best" else "test_accuracy")


def resolve_run_dir(path: str | Path, checkpoint: str = "last") -> Path:
    """``path`` itself when it is a run (it holds ``config.yaml``); for a folder of runs (``fisherkd compare`` or
    ``fisherkd demo`` output, whose runs are in ``runs/``; or an ``output_dir``), the finished run whose recorded
    test accuracy for ``checkpoint`` is highest (ties: the first by name)."""
    path = Path(path)
    if not path.is_dir():
        state = "is a file" if path.exists() else "does not exist"
        raise FileNotFoundError(
            f"run directory {str(path)!r} {state}; pass a folder written by `fisherkd train` (it holds "
            "config.yaml) or by `fisherkd demo` / `fisherkd compare`"
        )
    if (path / "config.yaml").exists():
        return path
    candidates = sorted((path / "runs").glob("*/summary.json")) + sorted(path.glob("*/summary.json"))
    scored = []
    for summary_path in candidates:
        accuracy = run_accuracy(json.loads(summary_path.read_text()), checkpoint)
        if accuracy is not None and (summary_path.parent / "config.yaml").exists():
            scored.append((accuracy, summary_path.parent))
    if not scored:
        raise FileNotFoundError(
            f"{str(path)!r} is not a run (no config.yaml) and holds no finished runs (*/summary.json or "
            "runs/*/summary.json); pass the folder of one run"
        )
    best = max(accuracy for accuracy, _ in scored)
    return next(run for accuracy, run in scored if accuracy == best)


def checkpoint_path(run_dir: Path, checkpoint: str) -> Path:
    if checkpoint not in ("last", "best"):
        raise ValueError(f"checkpoint must be 'last' or 'best', got {checkpoint!r}")
    path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if not path.exists():
        found = sorted(p.stem for p in (run_dir / "checkpoints").glob("*.pt"))
        hint = f"it has: {', '.join(found)}; pass --checkpoint {found[0]}" if found else "the run never saved one"
        raise FileNotFoundError(f"run {str(run_dir)!r} has no checkpoints/{checkpoint}.pt ({hint})")
    return path


def inference_module(distiller: nn.Module) -> nn.Module:
    """The module that makes the distilled model's predictions: the student, or what a method built around it
    (SimKD's student → projector → the teacher's classifier), as one module (see ``Distiller.inference_model``)."""
    return distiller.inference_model()


# ---------------------------------------------------------------------------------------------------- formats


def _onnx_modules() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise ImportError(ONNX_MISSING) from None
    return onnx, onnxruntime


def export_onnx(model: nn.Module, example: Tensor, path: Path) -> Predict:
    """Write ``model`` as ONNX with a dynamic batch axis, check it with ``onnx.checker`` and return an ONNX Runtime
    predictor. The TorchScript-based exporter (``dynamo=False``) is used: it needs neither onnxscript nor network."""
    onnx, onnxruntime = _onnx_modules()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notices; the output is verified below
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def predict(x: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {"input": x.cpu().numpy()})[0])

    return predict


def export_torchscript(model: nn.Module, example: Tensor, path: Path) -> Predict:
    """Trace ``model`` on ``example`` and save it; return the reloaded module as a predictor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings; a trace that does not generalise fails verification
        traced = torch.jit.trace(model, example, check_trace=False)
    traced.save(str(path))
    loaded = torch.jit.load(str(path), map_location="cpu")
    return lambda x: loaded(x)


def verify_logits(label: str, predict: Predict, inputs: Tensor, reference: Tensor) -> float:
    """Max |Δ| of ``predict`` vs PyTorch's logits on the held-out batch; raise when beyond ATOL + RTOL·|ref|."""
    with torch.no_grad():
        got = model_logits(predict(inputs)).float()
    if got.shape != reference.shape:
        raise ExportError(f"{label} export returns shape {tuple(got.shape)}, PyTorch {tuple(reference.shape)}")
    diff = (got - reference).abs()
    if not (diff <= ATOL + RTOL * reference.abs()).all():
        raise ExportError(
            f"{label} export does not match PyTorch on {len(inputs)} held-out test samples: max |Δ| = "
            f"{diff.max().item():.3g} exceeds atol {ATOL:g} + rtol {RTOL:g}·|logit|"
        )
    return diff.max().item()


@torch.no_grad()
def split_accuracy(predict: Predict, batches: Callable[[], Iterable[Any]]) -> float:
    """Top-1 accuracy of ``predict`` over a fresh pass of ``batches()`` (items with ``.x`` and ``.y``)."""
    correct = total = 0
    for batch in batches():
        correct += (model_logits(predict(batch.x)).argmax(-1) == batch.y).sum().item()
        total += len(batch.y)
    return correct / total


def first_inputs(batches: Callable[[], Iterable[Any]], n: int) -> Tensor:
    """The first ``n`` inputs of a pass (fewer if the split is smaller), without reading the rest."""
    taken, count = [], 0
    for batch in batches():
        taken.append(batch.x[: n - count])
        count += len(taken[-1])
        if count >= n:
            break
    return torch.cat(taken)


# ---------------------------------------------------------------------------------------------------- measuring


@torch.no_grad()
def median_seconds(model: nn.Module, inputs: Any, device: torch.device, warmup: int = 2, runs: int = 5) -> float:
    """Median wall time of ``runs`` forward passes after ``warmup`` untimed ones (CUDA synchronised)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        call_model(model, inputs)
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call_model(model, inputs)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_speed(
    models: Mapping[str, nn.Module], batch: Tensor, device: torch.device, warmup: int = 2, runs: int = 5
) -> dict[str, Any]:
    """Latency at batch 1 and latency + throughput at ``len(batch)`` of each model, eager PyTorch on ``device``."""
    rows = {}
    for label, model in models.items():
        model.to(device)
        one, many = batch[:1].to(device), batch.to(device)
        t1 = median_seconds(model, one, device, warmup, runs)
        tn = median_seconds(model, many, device, warmup, runs)
        rows[label] = {"latency_ms_batch1": 1e3 * t1, "latency_ms_batch": 1e3 * tn, "throughput": len(batch) / tn}
        model.cpu()
    return {
        **provenance(device),
        "device_type": device.type,
        "batch": len(batch),
        "warmup": warmup,
        "runs": runs,
        "models": rows,
    }


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the state dict's tensors: the size of its safetensors file, less a small header."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# ---------------------------------------------------------------------------------------------------- the run


def export_run(
    run_dir: str | Path,
    output: str | Path | None = None,
    formats: str | list[str] | tuple[str, ...] = FORMATS,
    checkpoint: str = "last",
    device: str = "auto",
    speed_batch: int = 256,
    speed_runs: int = 5,
) -> dict[str, Any]:
    """Export the student of ``run_dir`` (a run, or a folder of runs: see :func:`resolve_run_dir`) to ``output``
    (default ``RUN_DIR/export``), verify every format and write the model card; return what ``export.json`` holds."""
    from fisherkd.config import load_run_config
    from fisherkd.data import load_splits, make_loader
    from fisherkd.engine.trainer import resolve_device
    from fisherkd.metrics import FidelityMeter
    from fisherkd.run import build_student, rebuild_distiller
    from fisherkd.schemes import load_student_weights

    formats = parse_formats(formats)
    if "onnx" in formats:
        _onnx_modules()  # before any work: a missing package is the first thing to hear about
    run_dir = resolve_run_dir(run_dir, checkpoint)
    checkpoint_path(run_dir, checkpoint)
    out = Path(output) if output is not None else run_dir / "export"
    config = load_run_config(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    splits = load_splits(config.data)

    # without its teacher on this machine the student is still exported, with no fidelity rows: never retrain it
    missing_teacher = missing_teacher_reason(config)
    if config.teacher is not None and missing_teacher is None:
        distiller = rebuild_distiller(run_dir, config, splits, checkpoint)
        distiller.close()  # no taps: the exported module must be the bare student
        student, teacher = distiller.student, distiller.teacher.cpu().float().eval()
    else:
        distiller, student, teacher = None, build_student(config.student, splits), None
    # every student weight from the checkpoint, strictly: the teacher-less branch has loaded nothing yet
    student.load_state_dict(load_student_weights(run_dir, checkpoint), strict=True)
    model = (inference_module(distiller) if distiller is not None else student).cpu().float().eval()

    batch_size = config.train.eval_batch_size
    loader = make_loader(splits, "test", batch_size, shuffle=False, drop_last=False)

    def batches() -> Iterable[Any]:  # a fresh pass each call: an image folder is streamed, not held in memory
        return loader.epoch(0)

    held_out = first_inputs(batches, VERIFY_SAMPLES)
    example = held_out[:2]  # traced/exported at batch 2, verified at another size: the batch axis must be dynamic
    with torch.no_grad():
        reference = model_logits(model(held_out)).float()

    out.mkdir(parents=True, exist_ok=True)
    predictors: dict[str, Predict] = {"pytorch": model}
    files: dict[str, str] = {}
    skipped: dict[str, str] = {}
    if "safetensors" in formats:
        spec = student_spec(
            student,
            config.student.name,
            splits.in_channels,
            splits.num_classes,
            config.student.kwargs,
            config.student.dual_head,
            tuple(splits.input_shape),
        )
        if model is not student:
            spec["predictor"] = predictor_spec(model)
        save_student(model, spec, out)
        predictors["safetensors"] = load_student(out)
        files["safetensors"] = WEIGHTS_FILE
        files["spec"] = SPEC_FILE
    if "onnx" in formats:
        predictors["onnx"] = export_onnx(model, example, out / ONNX_FILE)
        files["onnx"] = ONNX_FILE
    if "torchscript" in formats:
        try:
            predictors["torchscript"] = export_torchscript(model, example, out / TORCHSCRIPT_FILE)
            files["torchscript"] = TORCHSCRIPT_FILE
        except Exception as err:  # a model the tracer cannot follow: the other formats still stand
            skipped["torchscript"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"

    expected = run_accuracy(summary, checkpoint)
    verification: dict[str, Any] = {}
    for label, predict in predictors.items():
        max_diff = verify_logits(label, predict, held_out, reference) if label != "pytorch" else 0.0
        accuracy = split_accuracy(predict, batches)
        if expected is not None and abs(accuracy - expected) > ACCURACY_TOLERANCE:
            raise ExportError(
                f"{label} export has test accuracy {accuracy:.4f}, the run recorded {expected:.4f} for "
                f"checkpoints/{checkpoint}.pt (tolerance {ACCURACY_TOLERANCE:g}): the checkpoint and the run disagree"
            )
        verification[label] = {"max_abs_diff": max_diff, "test_accuracy": accuracy}

    meter = FidelityMeter()
    with torch.no_grad():
        for batch in batches():
            x = batch.x
            meter.update(model_logits(model(x)), batch.y, model_logits(teacher(x)) if teacher is not None else None)
    metrics = meter.compute()

    speed_inputs = first_inputs(batches, speed_batch)
    timed = {"student": model} | ({"teacher": teacher} if teacher is not None else {})
    speed = measure_speed(timed, speed_inputs, resolve_device(device), runs=speed_runs)

    plots = []
    if (run_dir / "plots").is_dir():
        for plot in sorted((run_dir / "plots").glob("*.png")):
            (out / "plots").mkdir(exist_ok=True)
            shutil.copy2(plot, out / "plots" / plot.name)
            plots.append(f"plots/{plot.name}")

    student_size = (out / WEIGHTS_FILE).stat().st_size if "safetensors" in files else weight_bytes(model)
    manifest = {
        "run_dir": str(run_dir),
        "checkpoint": checkpoint,
        "output": str(out),
        "files": files,
        "skipped": skipped,
        "tolerance": {"atol": ATOL, "rtol": RTOL, "accuracy": ACCURACY_TOLERANCE, "samples": len(held_out)},
        "run_test_accuracy": expected,
        "verification": verification,
        "metrics": metrics,
        "speed": speed,
        "student": {"name": config.student.name, "parameters": count_parameters(model), "bytes": student_size},
        "missing_teacher": missing_teacher,
        "teacher": None
        if teacher is None
        else {
            "name": teacher_label(config),
            "parameters": count_parameters(teacher),
            "bytes": weight_bytes(teacher),
            "record": summary.get("teacher", {}),
        },
        "data": {
            "name": config.data.name,
            "input_shape": list(splits.input_shape),
            "num_classes": splits.num_classes,
            "test_samples": len(splits.test),
        },
        "plots": plots,
    }
    (out / "export.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "README.md").write_text(model_card(manifest, config))
    return manifest


def missing_teacher_reason(config: Any) -> str | None:
    """Why the run's teacher cannot be loaded here (not in the teacher cache, no checkpoint), or None when it can.

    An EMA teacher is in the run's checkpoint. A teacher absent from the cache would be trained again by
    ``get_teacher``, which can take longer than the run itself: the export leaves it out instead.
    """
    from fisherkd.paths import cache_dir
    from fisherkd.run import teacher_cache_path, teacher_data_key

    teacher = config.teacher
    if teacher is None:
        return "the run has no teacher"
    if teacher.ema_decay is not None:
        return None
    data = teacher_data_key(config.data)
    for member in teacher.members or [teacher]:
        if not member.checkpoint and not teacher_cache_path(member, data).exists():
            return f"teacher {member.name!r} is not in the teacher cache {cache_dir()} (set FISHERKD_CACHE)"
    return None


def teacher_label(config: Any) -> str:
    teacher = config.teacher
    if teacher.members:
        return "ensemble of " + ", ".join(m.name or "?" for m in teacher.members)
    if teacher.ema_decay is not None:
        return f"EMA of the student (decay {teacher.ema_decay:g})"
    return teacher.name


# ---------------------------------------------------------------------------------------------------- the card


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def recipe_lines(config: Any) -> list[str]:
    """One line per loss term: method, weight, hyper-parameters, layer pairs and Fisher block as configured."""
    from fisherkd.methods.base import method_class

    lines = []
    for spec in config.methods:
        weight = spec.weight if spec.weight is not None else method_class(spec.name).default_weight
        parts = [f"`{spec.name}` × {weight:g}"]
        if spec.hparams:
            parts.append(", ".join(f"{k}={v}" for k, v in spec.hparams.items()))
        if spec.pairs:
            parts.append("pairs " + ", ".join(f"{s or 'logits'} → {t or 'logits'}" for s, t in spec.pairs))
        fisher = spec.resolved_fisher()
        if fisher is not None:
            block = {"axis": fisher.axis, **fisher.model_dump(mode="json", exclude_defaults=True)}
            parts.append("Fisher " + ", ".join(f"{k}={v}" for k, v in block.items()))
        lines.append("- " + "; ".join(parts))
    return lines


def speed_section(speed: dict[str, Any], unit: str) -> list[str]:
    """The card's speed table: teacher and student latency at batch 1 and a large batch, where and how measured."""
    lines = [
        "",
        "## Speed",
        "",
        f"Eager PyTorch {speed['torch']} on {speed['device']}, float32; median of {speed['runs']} timed runs after "
        f"{speed['warmup']} warm-up runs, measured at export (on a busy machine, CPU numbers include the wait for a "
        f"free core). FisherKD {speed['fisherkd']}, commit {speed['commit']}, Python {speed['python']}.",
        "",
        f"| model | latency, batch 1 | latency, batch {speed['batch']} | throughput, batch {speed['batch']} |",
        "|---|---|---|---|",
    ]
    for label, row in speed["models"].items():
        lines.append(
            f"| {label} | {row['latency_ms_batch1']:.3f} ms | {row['latency_ms_batch']:.3f} ms | "
            f"{row['throughput']:,.0f} {unit}/s |"
        )
    return lines


def model_card(manifest: dict[str, Any], config: Any) -> str:
    """A Hugging Face model card: YAML front matter, then the distillation, its fidelity and its speed."""
    metrics, data, student, teacher = manifest["metrics"], manifest["data"], manifest["student"], manifest["teacher"]
    front = {
        "library_name": "pytorch",
        "tags": ["fisherkd", "knowledge-distillation", *([] if teacher is None else ["distilled"])],
        "datasets": [data["name"]],
        "metrics": ["accuracy"],
        "model-index": [
            {
                "name": f"{student['name']} ({Path(manifest['run_dir']).name})",
                "results": [
                    {
                        "task": {"type": "classification"},
                        "dataset": {"name": data["name"], "type": data["name"], "split": "test"},
                        "metrics": [{"type": "accuracy", "value": round(metrics["accuracy"], 6)}],
                    }
                ],
            }
        ],
    }
    pct = lambda key: f"{100 * metrics[key]:.2f}%" if key in metrics else "n/a"  # noqa: E731
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    lines += [f"# {student['name']} distilled by FisherKD", ""]
    lines += [
        f"Exported from `{manifest['run_dir']}` (`checkpoints/{manifest['checkpoint']}.pt`) by `fisherkd export`. "
        "Load it with:",
        "",
        "```python",
        "from fisherkd.models import load_student",
        "model = load_student('.')  # this folder; inputs as fisherkd's data loader prepares them",
        "```",
        "",
        "## Models",
        "",
        "| | model | parameters | weights on disk |",
        "|---|---|---|---|",
        f"| student | `{student['name']}` | {student['parameters']:,} | {_mb(student['bytes'])} |",
    ]
    if teacher is not None:
        lines.append(f"| teacher | `{teacher['name']}` | {teacher['parameters']:,} | {_mb(teacher['bytes'])} |")
    if teacher is None and manifest["missing_teacher"] != "the run has no teacher":
        lines += ["", f"No teacher rows below: {manifest['missing_teacher']}."]
    files = ", ".join(f"`{f}`" for f in manifest["files"].values())
    lines += ["", f"Files: {files}, `export.json` (everything below, machine-readable)."]
    for fmt, reason in manifest["skipped"].items():
        lines.append(f"Not exported: {fmt} ({reason}).")
    lines += [
        "",
        "## Data",
        "",
        f"`{data['name']}`: inputs of shape {tuple(data['input_shape'])} (batch axis first, dynamic), "
        f"{data['num_classes']} classes, {data['test_samples']} test samples. Inputs are expected as FisherKD's "
        f"`{data['name']}` loader prepares them (same scaling and normalisation).",
        "",
        "## Recipe",
        "",
        *recipe_lines(config),
        "",
        f"Trained {config.train.epochs} epochs, batch {config.train.batch_size}, {config.train.optimizer.name} "
        f"lr {config.train.optimizer.lr:g}, seed {config.seed}.",
        "",
        "## Evaluation (test split)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| accuracy | {pct('accuracy')} |",
        f"| ECE (15 bins) | {pct('ece')} |",
    ]
    if teacher is not None:
        lines += [
            f"| teacher accuracy | {pct('teacher_accuracy')} |",
            f"| top-1 agreement with the teacher | {pct('agreement')} |",
            f"| KL(teacher ‖ student), τ = 1 | {metrics['kl']:.4f} |",
            f"| agreement where the teacher is right | {pct('agreement_teacher_right')} |",
            f"| agreement where the teacher is wrong (error inheritance) | {pct('agreement_teacher_wrong')} |",
        ]
    tol = manifest["tolerance"]
    lines += [
        "",
        "## Verification",
        "",
        f"Each format's float32 logits on {tol['samples']} held-out test samples equal PyTorch's within "
        f"|Δ| ≤ {tol['atol']:g} + {tol['rtol']:g}·|logit| (ONNX through ONNX Runtime, CPU), and its accuracy on the "
        f"whole test split equals the run's record within {100 * tol['accuracy']:g} points; a mismatch stops the "
        "export.",
        "",
        "| format | max abs. logit difference | test accuracy |",
        "|---|---|---|",
    ]
    for fmt, row in manifest["verification"].items():
        lines.append(f"| {fmt} | {row['max_abs_diff']:.2e} | {100 * row['test_accuracy']:.2f}% |")
    if manifest["run_test_accuracy"] is not None:
        lines.append(f"| run record | | {100 * manifest['run_test_accuracy']:.2f}% |")
    else:
        lines += ["", "The run has no summary.json (it did not finish): no recorded accuracy to compare with."]
    lines += speed_section(manifest["speed"], "samples")
    if manifest["plots"]:
        lines += ["", "## Training plots", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in manifest["plots"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- Transformers


def export_hf(
    trainer_or_model: Any,
    output: str | Path,
    tokenizer: Any = None,
    example: Mapping[str, Tensor] | None = None,
    speed_runs: int = 5,
) -> dict[str, Any]:
    """Save a Hugging Face student (a ``DistillationTrainer`` or the model itself) for deployment.

    Writes ``save_pretrained`` output (weights in safetensors), the tokenizer (given, or the trainer's
    ``processing_class``) and a model card; reloads the folder with its ``transformers`` class from the local files
    alone and checks that its logits equal the student's on ``example`` (a batch dict; default: random token ids)
    within :data:`ATOL` + :data:`RTOL`. With a trainer, the card also has the teacher and the distillation recipe.
    """
    import transformers

    trainer = trainer_or_model if isinstance(trainer_or_model, transformers.Trainer) else None
    model = trainer.model if trainer is not None else trainer_or_model
    tokenizer = tokenizer if tokenizer is not None else getattr(trainer, "processing_class", None)
    teacher = getattr(trainer, "teacher_model", None)
    if not isinstance(model, transformers.PreTrainedModel):
        hint = ": merge a PEFT adapter first (model.merge_and_unload())" if hasattr(model, "merge_and_unload") else ""
        raise TypeError(
            f"export_hf needs a transformers PreTrainedModel (or a trainer of one), got {type(model).__name__}{hint}"
        )
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    device = next(model.parameters()).device
    if example is None:
        length = min(16, getattr(model.config, "max_position_embeddings", 16))
        generator = torch.Generator().manual_seed(0)
        example = {"input_ids": torch.randint(0, model.config.vocab_size, (4, length), generator=generator)}
    example = {k: v.to(device) for k, v in example.items() if k != "labels"}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        reference = model_logits(model(**example)).float()
    reloaded = type(model).from_pretrained(out, local_files_only=True).to(device).eval()
    max_diff = verify_logits("save_pretrained", lambda _: reloaded(**example), example["input_ids"], reference)
    timed = {"student": model} | ({"teacher": teacher} if teacher is not None else {})
    speed = measure_speed_hf(timed, example, device, runs=speed_runs)
    model.train(was_training)
    manifest = {
        "files": sorted(p.name for p in out.iterdir()),
        "tolerance": {"atol": ATOL, "rtol": RTOL, "samples": len(example["input_ids"])},
        "verification": {"save_pretrained": {"max_abs_diff": max_diff}},
        "student": {"name": type(model).__name__, "parameters": count_parameters(model), "bytes": weight_bytes(model)},
        "teacher": None
        if teacher is None
        else {"name": type(teacher).__name__, "parameters": count_parameters(teacher), "bytes": weight_bytes(teacher)},
        "methods": [] if trainer is None else hf_recipe(trainer),
        "speed": speed,
    }
    (out / "export.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "README.md").write_text(hf_model_card(manifest))
    return manifest


def measure_speed_hf(
    models: Mapping[str, nn.Module], example: Mapping[str, Tensor], device: torch.device, runs: int = 5
) -> dict[str, Any]:
    """Latency of each model on one example and on the whole ``example`` batch, on the models' device."""
    one = {k: v[:1] for k, v in example.items()}
    rows = {}
    for label, model in models.items():
        t1 = median_seconds(model, one, device, runs=runs)
        tn = median_seconds(model, example, device, runs=runs)
        batch = len(example["input_ids"])
        rows[label] = {"latency_ms_batch1": 1e3 * t1, "latency_ms_batch": 1e3 * tn, "throughput": batch / tn}
    return {
        **provenance(device),
        "device_type": device.type,
        "batch": len(example["input_ids"]),
        "warmup": 2,
        "runs": runs,
        "models": rows,
    }


def hf_recipe(trainer: Any) -> list[str]:
    config = getattr(trainer, "distillation", None)
    if config is None:
        return []
    lines = [f"- `{spec.name}`" + (f" × {spec.weight:g}" if spec.weight is not None else "") for spec in config.methods]
    if getattr(config, "token_loss", None) is not None:
        lines.append(f"- token loss: {config.token_loss.model_dump(mode='json', exclude_defaults=True)}")
    return lines


def hf_model_card(manifest: dict[str, Any]) -> str:
    student, teacher, speed = manifest["student"], manifest["teacher"], manifest["speed"]
    front = {"library_name": "transformers", "tags": ["fisherkd", "knowledge-distillation"]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    lines += [
        f"# {student['name']} distilled by FisherKD",
        "",
        "Saved by `fisherkd.export.export_hf` with `save_pretrained` (safetensors): load it with the `transformers` "
        "Auto class of its task, e.g. `AutoModelForSequenceClassification.from_pretrained(folder)`.",
        "",
        "## Models",
        "",
        "| | model | parameters | weights |",
        "|---|---|---|---|",
        f"| student | `{student['name']}` | {student['parameters']:,} | {_mb(student['bytes'])} |",
    ]
    if teacher is not None:
        lines.append(f"| teacher | `{teacher['name']}` | {teacher['parameters']:,} | {_mb(teacher['bytes'])} |")
    if manifest["methods"]:
        lines += ["", "## Recipe", "", *manifest["methods"]]
    tol, check = manifest["tolerance"], manifest["verification"]["save_pretrained"]
    lines += [
        "",
        "## Verification",
        "",
        f"Reloaded from this folder alone, its float32 logits on {tol['samples']} sequences equal the trained "
        f"student's within |Δ| ≤ {tol['atol']:g} + {tol['rtol']:g}·|logit| (max |Δ| {check['max_abs_diff']:.2e}).",
        *speed_section(speed, "sequences"),
    ]
    return "\n".join(lines) + "\n"
