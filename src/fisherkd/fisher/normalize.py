"""The one operator that turns raw importances into loss weights, and the warm-up ramp of its strength λ.

Every Fisher-weighted loss in FisherKD gets its weights from :func:`normalize`, whatever the axis (classes,
channels, positions, heads, tokens, samples, parameters): weights have mean 1, so the authors' loss weights stay
valid, and γ = 0 or λ = 0 gives exactly the unweighted loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def normalize(
    importance: Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
    *,
    dim: int = -1,
    floor: float = 1e-3,
    clip: tuple[float, float] = (0.1, 10.0),
    mask: Tensor | None = None,
) -> Tensor:
    """Weights w with mean 1 along ``dim`` from raw importances r ≥ 0 (every other axis is a separate row).

    r̃ = max(r, floor·mean r);  u = r̃^γ;  v = (1 − λ) + λ·u / mean u;  w = clip(s·v, lo, hi)

    with the one scale s > 0 that makes mean w = 1 *exactly*. (Clipping and then dividing by the mean, the
    obvious recipe, moves the clipped entries back outside [lo, hi] whenever the clip is active: clipping the top
    lowers the mean, and dividing by it pushes the top above hi again.) γ sharpens (γ > 1) or flattens (γ < 1)
    the importances, λ ∈ [0, 1] mixes them with uniform weights, the floor keeps a dead channel from getting a
    weight of 0, and the clip bounds how much any entry can dominate. γ = 0 or λ = 0 returns all ones exactly.
    ``mask`` (same shape, True = valid) leaves entries out of every mean (padding tokens); they get weight 1.
    """
    lo, hi = clip
    if not 0.0 < lo <= 1.0 <= hi:
        raise ValueError(f"clip must satisfy 0 < lo <= 1 <= hi so that mean-1 weights exist, got {clip}")
    if gamma == 0.0 or lam == 0.0:
        return torch.ones_like(importance, dtype=torch.float32)
    r = importance.detach().float().clamp_min(0.0).movedim(dim, -1)
    valid = torch.ones_like(r, dtype=torch.bool) if mask is None else mask.to(torch.bool).movedim(dim, -1)
    count = valid.sum(-1, keepdim=True).clamp_min(1)
    r = torch.where(valid, r, 0.0)
    r = torch.maximum(r, floor * r.sum(-1, keepdim=True) / count)
    # Scale so the largest entry is 1 before the power: r̃^γ cannot overflow, and u/mean u is scale-free anyway.
    top = r.amax(-1, keepdim=True)
    u = torch.where(top > 0, r / top.clamp_min(torch.finfo(r.dtype).tiny), 1.0).pow(gamma)
    u = torch.where(valid, u, 0.0)
    v = (1.0 - lam) + lam * u * (count / u.sum(-1, keepdim=True))
    w = _clip_to_mean_one(torch.where(valid, v, 0.0), valid, count, lo, hi)
    return torch.where(valid, w, 1.0).movedim(-1, dim)


def _clip_to_mean_one(v: Tensor, valid: Tensor, count: Tensor, lo: float, hi: float) -> Tensor:
    """clip(s·v, lo, hi) over the last axis with the s > 0 that makes the mean over valid entries exactly 1.

    S(s) = Σ_valid clip(s·v_i, lo, hi) is continuous, non-decreasing and piecewise linear in s with breakpoints at
    lo/v_i and hi/v_i, and S = lo·n at the smallest breakpoint, hi·n at the largest. Evaluating S at every
    breakpoint (sorted v, prefix sums and binary search: O(n log n), no loop, no host sync) finds the segment
    where S crosses n; on it the clipped sets are fixed and s solves a linear equation.
    """
    n_invalid = (~valid).sum(-1, keepdim=True)  # invalid entries are 0: they sort first and count as "below"
    ordered = v.sort(-1).values
    prefix = F.pad(ordered.cumsum(-1), (1, 0))
    size = v.shape[-1]
    scale_of = torch.where(valid, v, torch.inf)
    breakpoints = torch.cat([lo / scale_of, hi / scale_of], -1)
    breakpoints = torch.where(breakpoints.isfinite(), breakpoints, breakpoints.nan_to_num(posinf=0.0).amax(-1, True))

    def segment(s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # Clipped sets just to the right of s: below = {v < lo/s}, above = {v >= hi/s}.
        below = torch.searchsorted(ordered.contiguous(), (lo / s).contiguous())
        above = size - torch.searchsorted(ordered.contiguous(), (hi / s).contiguous())
        middle = prefix.gather(-1, size - above) - prefix.gather(-1, below)
        return (below - n_invalid).to(v.dtype), above.to(v.dtype), middle

    below, above, middle = segment(breakpoints)
    total = lo * below + hi * above + breakpoints * middle
    start = torch.where(total <= count, breakpoints, 0.0).amax(-1, keepdim=True)
    end = torch.where(breakpoints > start, breakpoints, torch.inf).amin(-1, keepdim=True)
    end = torch.where(end.isfinite(), end, 2 * start)
    # Classify at the middle of the segment, not at its ends: lo/(lo/v) need not round back to v, and tied v
    # would then land on the wrong side.
    below, above, middle = segment((start + end) / 2)
    s = (count - lo * below - hi * above) / middle.clamp_min(torch.finfo(v.dtype).tiny)
    s = torch.where(middle > 0, s, start).clamp(start, end)
    return (s * v).clamp(lo, hi)


def ramp(step: int, lam: float, warmup_steps: int) -> float:
    """λ at optimizer step ``step``: rises linearly from 0 to ``lam`` over ``warmup_steps`` steps, then stays."""
    if warmup_steps <= 0:
        return lam
    return lam * min(1.0, step / warmup_steps)
