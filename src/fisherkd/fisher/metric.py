"""Low-rank Fisher metrics for feature hints: the ``direction`` axis turns a C×C statistic into a PSD metric M.

A hint d = P(a_s) − a_t measured as dᵀMd (see :func:`fisherkd.functional.fitnet`) with M = I/C is the plain MSE.
The teacher's Fisher at the tapped layer, M_l = J_lᵀ F_p J_l = E_{ŷ∼p}[g gᵀ] with g = ∂ log p(ŷ|x)/∂a_l, says
which directions of a_l the prediction reads (DESIGN.md §4b). From its eigen-decomposition U Λ Uᵀ (descending):

- ``fisher``:     M = U_k Λ_k^γ U_kᵀ / tr Λ_k^γ + ε·I/C, k the smallest count with ≥ ``energy`` of tr Λ
  (at most ``rank``): the hint along the top-k Fisher directions, scaled by their eigenvalues; the small
  isotropic term ε pins the rest (the null space of the Fisher).
- ``complement``: M = (I − U_kU_kᵀ)/(C − k) + ε·I/C (k ≤ C − 1): the hint where the teacher's prediction is blind.
- ``row`` / ``null``: the projector on the row space / null space of the teacher head's weight W (K×C, read at
  the head's input), scaled to trace 1, + ε·I/C. No Fisher estimate: the ablations of the study.

λ mixes with the isotropic metric, M_λ = (1 − λ)·I/C + λ·M, so λ = 0 is the plain hint and the trace is
(1 − λ) + λ(1 + ε). γ is an exponent on the eigenvalues of the ``fisher`` variant only (γ → 0 tends to the
projector on the top-k directions; γ = 0 itself is, as on every axis, the unweighted loss).

Everything stays on the device: the rank k is a mask over the sorted eigenvalues, never read on the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

DIRECTIONS = ("fisher", "complement", "row", "null")
HEAD_SPACES = frozenset({"row", "null"})  # from the head's weight: no Fisher statistic


def _solver_dtype(x: Tensor) -> torch.dtype:
    # eigh / svd of a C×C matrix (C ≤ a few hundred) is cheap in float64; MPS has no float64
    return torch.float64 if x.device.type in ("cpu", "cuda") else torch.float32


def mix_isotropic(metric: Tensor, lam: float) -> Tensor:
    """(1 − λ)·I/C + λ·M: λ = 0 is the plain hint (cheap: the warm-up ramp of λ needs no new eigen-decomposition)."""
    if lam == 1.0:
        return metric
    size = metric.shape[-1]
    return (1.0 - lam) * torch.eye(size, dtype=metric.dtype, device=metric.device) / size + lam * metric


def _finish(projected: Tensor, isotropic: float, lam: float) -> Tensor:
    """(1 − λ)·I/C + λ·(projected + ε·I/C), symmetrized, float32."""
    size = projected.shape[-1]
    metric = projected + isotropic * torch.eye(size, dtype=projected.dtype, device=projected.device) / size
    return mix_isotropic((metric + metric.T) / 2, lam).float()


def fisher_metric(
    statistic: Tensor,
    directions: str = "fisher",
    *,
    energy: float = 0.95,
    rank: int | None = None,
    isotropic: float = 0.1,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """(M, k): the ``fisher`` or ``complement`` metric (see the module docstring) of a symmetric PSD C×C
    ``statistic``, and the number k of kept directions as a device scalar."""
    if directions not in ("fisher", "complement"):
        raise ValueError(f"fisher_metric: directions must be fisher or complement, got {directions!r}")
    if statistic.dim() != 2 or statistic.shape[0] != statistic.shape[1]:
        raise ValueError(f"fisher_metric: needs a square C×C statistic, got shape {tuple(statistic.shape)}")
    s = statistic.detach().to(_solver_dtype(statistic))
    values, vectors = torch.linalg.eigh((s + s.T) / 2)
    values, vectors = values.flip(0).clamp_min(0.0), vectors.flip(1)  # descending; rounding can give −0
    size = values.shape[0]
    before = torch.cumsum(values, 0) - values  # the trace share of the directions ahead of each one
    keep = before < energy * values.sum()  # smallest k with ≥ energy of the trace (k ≥ 1)
    cap = rank if directions == "fisher" else min(rank or size, size - 1)  # complement: never empty
    if cap is not None:
        keep &= torch.arange(size, device=values.device) < cap
    if directions == "fisher":
        scale = torch.where(keep, values.pow(gamma), 0.0)
        scale = scale / scale.sum().clamp_min(torch.finfo(scale.dtype).tiny)
    else:
        scale = (~keep).to(values.dtype) / (~keep).sum()
    projected = (vectors * scale) @ vectors.T
    return _finish(projected, isotropic, lam), keep.sum().float()


def head_space_metric(
    weight: Tensor, directions: str, *, isotropic: float = 0.1, lam: float = 1.0
) -> tuple[Tensor, Tensor]:
    """(M, dimension): the projector on the row space (``row``) or null space (``null``) of a head's K×C weight,
    scaled to trace 1, + ε·I/C, mixed by λ; and the dimension of that space. The rank of W counts the singular
    values above the usual tolerance σ_max·max(K, C)·eps."""
    if directions not in HEAD_SPACES:
        raise ValueError(f"head_space_metric: directions must be row or null, got {directions!r}")
    w = weight.detach().to(_solver_dtype(weight))
    _, singular, vh = torch.linalg.svd(w, full_matrices=True)  # vh: C×C, its first rows span the row space
    size = vh.shape[0]
    tolerance = singular.amax() * max(w.shape) * torch.finfo(w.dtype).eps
    row = torch.zeros(size, dtype=torch.bool, device=w.device)
    row[: singular.shape[0]] = singular > tolerance
    chosen = row if directions == "row" else ~row
    dimension = chosen.sum()
    if directions == "null" and not bool(dimension > 0):  # one read, when the metric is built (it is cached)
        raise ValueError(
            f"directions: null: the head's weight {tuple(weight.shape)} has full column rank {size}, so its null "
            "space is empty; use directions: row, fisher or complement"
        )
    scale = chosen.to(w.dtype) / dimension.clamp_min(1)
    projected = (vh.T * scale) @ vh
    return _finish(projected, isotropic, lam), dimension.float()
