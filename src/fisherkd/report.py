"""``fisherkd report RUN_DIR``: what a finished run learned from its teacher, as PNGs and a markdown summary.

- training curves (loss, test accuracy, agreement);
- layer-wise linear CKA between every teacher stage and every student stage (Kornblith et al., ICML 2019);
- attention-map agreement: Grad-CAM (Selvaraju et al., ICCV 2017) of the *teacher's* predicted class, for teacher
  and student, per sample; IoU of the maps thresholded at 0.5 (after min-max scaling to [0, 1]) and the
  threshold-free cosine. Models without a spatial layer use input × gradient instead, for both sides alike;
- error inheritance: agreement with the teacher where it is right and where it is wrong;
- for ensembles, the same attention agreement between each pair of teachers;
- Fisher weight heat maps the run wrote, when it was Fisher-weighted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fisherkd import functional as Fn
from fisherkd.config import load_run_config
from fisherkd.core import model_logits
from fisherkd.data import load_splits, make_loader
from fisherkd.taps import Taps


def stages_of(model: nn.Module) -> list[str]:
    """A model's stage names: zoo models list them in ``stages``; otherwise its direct children that have weights.
    An ensemble's are its members' stages, as ``members.<i>.<stage>``."""
    members = getattr(model, "members", None)
    if isinstance(members, nn.ModuleList):  # the ensemble calls each member: its own children never run as one
        return [f"members.{i}.{name}" for i, member in enumerate(members) for name in stages_of(member)]
    stages = getattr(model, "stages", None)
    if stages:
        return list(stages)
    return [name for name, child in model.named_children() if any(True for _ in child.parameters())]


@torch.no_grad()
def stage_features(model: nn.Module, x: Tensor, names: list[str]) -> dict[str, Tensor]:
    with Taps(model, names) as taps:
        model(x)
        return {name: taps[name].flatten(1).float() for name in names}


def cka_matrix(teacher: nn.Module, student: nn.Module, x: Tensor) -> tuple[Tensor, list[str], list[str]]:
    """Linear CKA (1 − the ``cka`` loss) between each teacher stage (rows) and each student stage (columns)."""
    t_names, s_names = stages_of(teacher), stages_of(student)
    t_feats, s_feats = stage_features(teacher, x, t_names), stage_features(student, x, s_names)
    matrix = torch.tensor([[1.0 - Fn.cka(s_feats[s], t_feats[t]).item() for s in s_names] for t in t_names])
    return matrix, t_names, s_names


def last_spatial_stage(model: nn.Module, x: Tensor) -> str | None:
    """The deepest stage whose output still has positions (B×C×L or B×C×H×W)."""
    names = stages_of(model)
    shapes = {name: feature.shape for name, feature in _raw_features(model, x[:1], names).items()}
    spatial = [name for name in names if len(shapes[name]) >= 3]
    return spatial[-1] if spatial else None


@torch.no_grad()
def _raw_features(model: nn.Module, x: Tensor, names: list[str]) -> dict[str, Tensor]:
    with Taps(model, names) as taps:
        model(x)
        return {name: taps[name] for name in names}


def class_activation_map(model: nn.Module, x: Tensor, target: Tensor, layer: str | None) -> Tensor:
    """Grad-CAM of class ``target`` at ``layer`` (ReLU(Σ_c α_c·A_c), α_c = spatial mean of ∂z_y/∂A_c), upsampled
    to the input's positions; with ``layer=None``, |x · ∂z_y/∂x| summed over channels. Returns B × positions."""
    with torch.enable_grad():
        # a frozen teacher's activations need a graph too: it starts from the input, not the weights
        inputs = x.detach().clone().requires_grad_(True)
        if layer is None:
            score = model_logits(model(inputs)).gather(1, target[:, None]).sum()
            (grad,) = torch.autograd.grad(score, inputs)
            saliency = (grad * inputs).abs()
            return saliency.flatten(1) if saliency.dim() == 2 else saliency.sum(1).flatten(1)
        with Taps(model, [layer]) as taps:
            score = model_logits(model(inputs)).gather(1, target[:, None]).sum()
            activation = taps[layer]
            (grad,) = torch.autograd.grad(score, activation)
    spatial_dims = tuple(range(2, activation.dim()))
    alpha = grad.mean(dim=spatial_dims, keepdim=True)
    cam = F.relu((alpha * activation).sum(1, keepdim=True)).detach()
    size = x.shape[2:] if x.dim() > 2 else x.shape[1:]
    mode = "linear" if cam.dim() == 3 else "bilinear"
    return F.interpolate(cam, size=tuple(size), mode=mode, align_corners=False).flatten(1)


def map_agreement(a: Tensor, b: Tensor, threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """Per-sample IoU of min-max-scaled maps thresholded at ``threshold``, and the cosine of the raw maps."""

    def scaled(m: Tensor) -> Tensor:
        low, high = m.min(1, keepdim=True).values, m.max(1, keepdim=True).values
        return (m - low) / (high - low).clamp_min(1e-12)

    mask_a, mask_b = scaled(a) >= threshold, scaled(b) >= threshold
    union = (mask_a | mask_b).sum(1).clamp_min(1)
    iou = (mask_a & mask_b).sum(1) / union
    return iou.float(), F.cosine_similarity(a, b, dim=1)


def attention_agreement(teacher: nn.Module, student: nn.Module, x: Tensor) -> dict[str, float]:
    """Mean Grad-CAM IoU and cosine between teacher and student for the teacher's predicted classes."""
    with torch.no_grad():
        predicted = model_logits(teacher(x)).argmax(-1)
    t_layer, s_layer = last_spatial_stage(teacher, x), last_spatial_stage(student, x)
    if t_layer is None or s_layer is None:
        t_layer = s_layer = None  # compare like with like: input × gradient on both sides
    iou, cosine = map_agreement(
        class_activation_map(teacher, x, predicted, t_layer), class_activation_map(student, x, predicted, s_layer)
    )
    return {
        "iou": iou.mean().item(),
        "cosine": cosine.mean().item(),
        "teacher_layer": t_layer or "input",
        "student_layer": s_layer or "input",
    }


def write_report(run_dir: str | Path, samples: int = 256, checkpoint: str = "last") -> Path:
    """Rebuild the run from its config and checkpoint; write ``report/`` with PNGs and ``report.md``."""
    from fisherkd.metrics import FidelityMeter
    from fisherkd.plots import plot_heatmap, plot_run
    from fisherkd.run import rebuild_distiller

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)  # before writing anything into run_dir
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    splits = load_splits(config.data)
    distiller = rebuild_distiller(run_dir, config, splits, checkpoint).cpu().eval()
    student, teacher = distiller.student, distiller.teacher
    batch = next(iter(make_loader(splits, "test", samples, shuffle=False).epoch(0)))
    summary: dict[str, Any] = {"run": str(run_dir), "checkpoint": checkpoint, "samples": len(batch.y)}
    lines = [f"# Report: {run_dir.name}", "", f"Checkpoint `{checkpoint}`, {len(batch.y)} test samples for maps.", ""]

    curves = plot_run(run_dir)
    lines += ["## Training curves", "", f"![curves]({Path('..') / curves.relative_to(run_dir)})", ""]

    meter = FidelityMeter()
    with torch.no_grad():
        for b in make_loader(splits, "test", 1000, shuffle=False, drop_last=False).epoch(0):
            teacher_logits = distiller.teacher_forward(b.x) if teacher is not None else None
            meter.update(model_logits(student(b.x)), b.y, teacher_logits)
    fidelity = meter.compute()
    summary["test"] = fidelity
    lines += ["## Accuracy and fidelity (test split)", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in fidelity.items()] + [""]

    if teacher is not None:
        matrix, t_names, s_names = cka_matrix(teacher, student, batch.x)
        plot_heatmap(matrix, t_names, s_names, out / "cka.png", "linear CKA", "student stage", "teacher stage")
        summary["cka"] = {"teacher_stages": t_names, "student_stages": s_names, "matrix": matrix.tolist()}
        lines += ["## Linear CKA, teacher × student stages", "", "![cka](cka.png)", ""]

        agreement = attention_agreement(teacher, student, batch.x)
        summary["attention"] = agreement
        lines += [
            "## Attention maps (Grad-CAM of the teacher's predicted class)",
            "",
            f"Teacher layer `{agreement['teacher_layer']}`, student layer `{agreement['student_layer']}`: "
            f"IoU at 0.5 = {agreement['iou']:.3f}, cosine = {agreement['cosine']:.3f}.",
            "",
        ]
        members = getattr(teacher, "members", None)
        if members is not None and len(members) > 1:
            pairs = {
                f"{i}-{j}": attention_agreement(members[i], members[j], batch.x)
                for i in range(len(members))
                for j in range(i + 1, len(members))
            }
            summary["teacher_attention"] = pairs
            lines += ["Between teachers:", ""]
            lines += [f"- teachers {k}: IoU {v['iou']:.3f}, cosine {v['cosine']:.3f}" for k, v in pairs.items()]
            lines += [""]
        if "agreement_teacher_right" in fidelity:
            lines += [
                "## Error inheritance",
                "",
                f"Agreement where the teacher is right: {100 * fidelity['agreement_teacher_right']:.1f}%; "
                f"where it is wrong: {100 * fidelity.get('agreement_teacher_wrong', float('nan')):.1f}% "
                "(the student copies those mistakes this often).",
                "",
            ]
    fisher_maps = sorted((run_dir / "plots").glob("fisher*.png"))
    if fisher_maps:
        lines += ["## Fisher weights", ""] + [f"![{p.stem}](../plots/{p.name})" for p in fisher_maps] + [""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    distiller.close()
    return out
