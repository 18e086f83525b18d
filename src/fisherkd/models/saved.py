"""An exported student on disk: ``model.safetensors`` (its weights) + ``student.json`` (how to build it).

:func:`save_student` writes the pair and :func:`load_student` rebuilds the model from it in one call, with no
config, checkpoint or teacher: ``fisherkd.models.load_student("runs/export/mlp")``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from fisherkd.models.registry import create_model

WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "student.json"
SPEC_FORMAT = "fisherkd-student/1"


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("safetensors export needs safetensors: pip install 'fisherkd[export]'") from None
    return safetensors.torch


def student_spec(
    model: nn.Module,
    name: str,
    in_channels: int,
    num_classes: int,
    kwargs: dict[str, Any] | None = None,
    dual_head: str | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """What :func:`load_student` needs to rebuild ``model``: its zoo name and constructor arguments, and the dual
    head (``fisherkd.schemes.add_dual_head``) it carries, with that head's inference mode as it was trained."""
    spec: dict[str, Any] = {
        "format": SPEC_FORMAT,
        "model": name,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "kwargs": dict(kwargs or {}),
        "dual_head": None,
        "input_shape": list(input_shape) if input_shape is not None else None,
    }
    if dual_head:
        spec["dual_head"] = {"head": dual_head, "inference": model.get_submodule(dual_head).inference}
    return spec


# The layers a predictor's projector may be made of, by the constructor arguments that rebuild each.
_LAYERS: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "Conv2d": (nn.Conv2d, ("in_channels", "out_channels", "kernel_size", "stride", "padding")),
    "Conv1d": (nn.Conv1d, ("in_channels", "out_channels", "kernel_size", "stride", "padding")),
    "Linear": (nn.Linear, ("in_features", "out_features")),
    "BatchNorm2d": (nn.BatchNorm2d, ("num_features",)),
    "BatchNorm1d": (nn.BatchNorm1d, ("num_features",)),
    "ReLU": (nn.ReLU, ()),
    "Identity": (nn.Identity, ()),
}


def _layer(module: nn.Module) -> dict[str, Any]:
    kind = type(module).__name__
    if kind not in _LAYERS:
        raise ValueError(
            f"load_student cannot rebuild a {kind} in a predictor's projector (it knows {', '.join(_LAYERS)}); the "
            "ONNX and TorchScript exports hold any module"
        )
    spec = {"type": kind, **{arg: getattr(module, arg) for arg in _LAYERS[kind][1]}}
    if hasattr(module, "bias") and kind not in ("BatchNorm2d", "BatchNorm1d"):
        spec["bias"] = module.bias is not None
    return spec


def predictor_spec(predictor: nn.Module) -> dict[str, Any]:
    """How to rebuild a :class:`~fisherkd.methods.head.TeacherHeadPredictor` around the student: its tap, the
    layers of its projector, its pooling and the shape of the teacher's classifier it carries."""
    projector = predictor.projector
    layers = [_layer(m) for m in projector] if isinstance(projector, nn.Sequential) else [_layer(projector)]
    classifier = predictor.classifier
    return {
        "tap": predictor.tap,
        "pool_to": list(predictor.pool_to) if predictor.pool_to is not None else None,
        "projector": layers,
        "sequential": isinstance(projector, nn.Sequential),
        "classifier": [classifier.in_features, classifier.out_features, classifier.bias is not None],
    }


def _build_predictor(student: nn.Module, spec: dict[str, Any]) -> nn.Module:
    from fisherkd.methods.head import TeacherHeadPredictor  # the method library, only for this kind of export

    def build(layer: dict[str, Any]) -> nn.Module:
        cls, args = _LAYERS[layer["type"]]
        extra = {"bias": layer["bias"]} if "bias" in layer else {}
        return cls(*(layer[a] for a in args), **extra)

    layers = [build(layer) for layer in spec["projector"]]
    projector = nn.Sequential(*layers) if spec["sequential"] else layers[0]
    in_features, out_features, bias = spec["classifier"]
    pool_to = tuple(spec["pool_to"]) if spec["pool_to"] is not None else None
    return TeacherHeadPredictor(student, spec["tap"], projector, nn.Linear(in_features, out_features, bias), pool_to)


def save_student(model: nn.Module, spec: dict[str, Any], directory: str | Path) -> Path:
    """Write ``model``'s state dict as ``model.safetensors`` and ``spec`` as ``student.json``; return the weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share storage or are views: save contiguous copies
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    path = directory / WEIGHTS_FILE
    _safetensors().save_file(state, str(path), metadata={"format": "pt"})
    (directory / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    return path


def load_student(directory: str | Path) -> nn.Module:
    """The student exported to ``directory`` by ``fisherkd export``, rebuilt and loaded, in eval mode, on the CPU.

    Weights are read from safetensors (no code runs); every weight must fit the rebuilt model (strict load).
    """
    directory = Path(directory)
    spec_path = directory / SPEC_FILE
    if not spec_path.exists():
        if (directory / "config.json").exists():
            raise FileNotFoundError(
                f"{str(directory)!r} is a Hugging Face export: load it with "
                f"transformers.AutoModelForSequenceClassification.from_pretrained({str(directory)!r}) (or the Auto "
                "class of its task)"
            )
        raise FileNotFoundError(
            f"{str(directory)!r} has no {SPEC_FILE}: export a run into it first, e.g. "
            f"`fisherkd export RUN_DIR --output {directory}`"
        )
    spec = json.loads(spec_path.read_text())
    if spec.get("format") != SPEC_FORMAT:
        raise ValueError(f"{spec_path} has format {spec.get('format')!r}; this fisherkd reads {SPEC_FORMAT!r}")
    model = create_model(spec["model"], spec["in_channels"], spec["num_classes"], **spec["kwargs"])
    if spec["dual_head"]:
        from fisherkd.schemes import add_dual_head

        add_dual_head(model, spec["dual_head"]["head"], spec["dual_head"]["inference"])
    if spec.get("predictor"):  # it predicts through the teacher's classifier (SimKD): one module with the student
        model = _build_predictor(model, spec["predictor"])
    model.load_state_dict(_safetensors().load_file(str(directory / WEIGHTS_FILE)), strict=True)
    return model.eval()
