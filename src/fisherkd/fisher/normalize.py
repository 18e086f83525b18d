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
    γ < 0 favours the *least* important entries (a confident sample over an uncertain one): the floor comes
    first, so it is what bounds the weight of a near-zero importance, (floor·mean r)^γ, and the clip then bounds
    that too. ``mask`` (same shape, True = valid) leaves entries out of every mean (padding tokens); they get
    weight 1.
    """
    lo, hi = clip
    if not 0.0 < lo <= 1.0 <= hi:
        raise ValueError(f"clip must satisfy 0 < lo <= 1 <= hi so that mean-1 weights exist, got {clip}")
    if gamma == 0.0 or lam == 0.0 or lo == 1.0 or hi == 1.0:  # (lo or hi = 1: mean 1 leaves only all ones)
        return torch.ones_like(importance, dtype=torch.float32)
    last = dim in (-1, importance.dim() - 1)
    r = importance.detach().float()
    r = r if last else r.movedim(dim, -1)
    valid = None if mask is None else mask.to(r.dtype) if last else mask.to(r.dtype).movedim(dim, -1)  # 1 = valid
    count: Tensor | float = float(r.shape[-1])
    if valid is not None:
        r = r * valid
        count = valid.sum(-1, keepdim=True).clamp_min(1.0)
    # tiny > 0 makes an all-zero row uniform rather than 0/0; it is far below any floor·mean of a real row.
    r = torch.maximum(r.clamp_min(_TINY), r.sum(-1, keepdim=True) * (floor / count))
    # Scaled so that the largest u is 1 (r̃ over its max for γ > 0, over its min for γ < 0): r̃^γ cannot overflow,
    # and u/mean u is scale-free anyway. Masked entries (floor·mean here) cannot be the max of a row; they are left
    # out of the min (with floor = 0 they would make every valid u underflow to 0).
    if gamma > 0:
        u = r / r.amax(-1, keepdim=True)
    else:
        u = r / (r if valid is None else torch.where(valid > 0, r, torch.inf)).amin(-1, keepdim=True)
    u = u if gamma == 1.0 else u.sqrt() if gamma == 0.5 else u.pow(gamma)
    if valid is not None:
        u = torch.where(valid > 0, u, 0.0)  # not u·valid: a masked u may be inf (γ < 0)
    # λ = 1: v = u/mean u, but the solve below finds the scale itself (clip(s·c·u) = clip(s'·u)): u goes in as is
    v = u if lam == 1.0 else u * (lam * count / u.sum(-1, keepdim=True)) + (1.0 - lam)
    if valid is None:
        w = _clip_to_mean_one(v, count, lo, hi)
    else:
        w = torch.where(valid > 0, _clip_to_mean_one(v * valid, count, lo, hi, invalid=r.shape[-1] - count), 1.0)
    return w if last else w.movedim(-1, dim)


_TINY = torch.finfo(torch.float32).tiny


# Rows·(2n)·n at most for the broadcast solve: it is ~2× faster than the sort below for one row of a few hundred
# (a training batch of samples), where the cost is the number of small kernels, not their size; beyond, O(n²) loses.
_BROADCAST_ELEMENTS = 1 << 17


def _clip_to_mean_one(
    v: Tensor, count: Tensor | float, lo: float, hi: float, invalid: Tensor | float = 0.0
) -> Tensor:
    """clip(s·v, lo, hi) over the last axis with the s > 0 that makes its mean over the ``count`` valid entries
    exactly 1 (``invalid`` entries are zeros of ``v``); 0 < lo < 1 < hi.

    S(s) = Σ_valid clip(s·v_i, lo, hi) is continuous, non-decreasing and piecewise linear in s with breakpoints at
    lo/v_i and hi/v_i, and S = lo·n at the smallest breakpoint, hi·n at the largest; the solution lies on the
    segment between the last breakpoint with S ≤ n and the next one. Small rows evaluate S at every breakpoint at
    once (a 2n×n broadcast, ~20 kernels) and interpolate linearly on that segment; larger ones use the sort.
    """
    if v.numel() * 2 * v.shape[-1] > _BROADCAST_ELEMENTS:
        return _clip_sorted(v, count, lo, hi, invalid)
    # A zero of v (an invalid entry, or a u that underflowed) is clipped to lo at every finite s: its breakpoints,
    # lo/0 = hi/0 = inf, move to s = 0, where they change nothing (and cannot make inf·0 = nan below).
    breakpoints = (lo / v).nan_to_num(posinf=0.0)
    breakpoints = torch.cat([breakpoints, breakpoints * (hi / lo)], -1)
    total = (breakpoints.unsqueeze(-1) * v.unsqueeze(-2)).clamp_(lo, hi).sum(-1)
    if not isinstance(invalid, float):
        total = total - lo * invalid  # the invalid zeros are counted at lo
    at = torch.stack([breakpoints, total], -2)  # [..., 2, 2n]: (s, S(s)) at each breakpoint
    below = (total <= count).unsqueeze(-2)
    # S is non-decreasing in s: the largest (s, S) with S ≤ n and the smallest with S > n are the segment's ends.
    start = torch.where(below, at, -torch.inf).amax(-1)
    end = torch.where(below, torch.inf, at).amin(-1)
    # S is linear on the segment (S_end > n ≥ S_start, so no 0/0): interpolate
    s = torch.lerp(start[..., :1], end[..., :1], (count - start[..., 1:]) / (end[..., 1:] - start[..., 1:]))
    return (s * v).clamp(lo, hi)


def _clip_sorted(
    v: Tensor, count: Tensor | float, lo: float, hi: float, invalid: Tensor | float = 0.0
) -> Tensor:
    """:func:`_clip_to_mean_one` for large rows.

    S(s) = Σ_valid clip(s·v_i, lo, hi) is continuous, non-decreasing and piecewise linear in s with breakpoints at
    lo/v_i and hi/v_i, and S = lo·n at the smallest breakpoint, hi·n at the largest. Evaluating S at every
    breakpoint (sorted v, prefix sums and binary search: O(n log n), no loop, no host sync) finds the segment
    where S crosses n; on it the clipped sets are fixed and s solves a linear equation.
    """
    ordered = v.sort(-1).values.contiguous()
    prefix = F.pad(ordered.cumsum(-1), (1, 0))
    size = v.shape[-1]

    def sets(s: Tensor) -> tuple[Tensor, Tensor]:
        """lo·#below + hi·#above and Σ v over the middle, for the clipped sets just to the right of s."""
        inverse = s.reciprocal()
        low = torch.searchsorted(ordered, inverse * lo)  # v < lo/s (with the invalid zeros)
        high = torch.searchsorted(ordered, inverse * hi)  # v < hi/s; the rest is above
        clipped = lo * (low - invalid) + hi * (size - high)
        return clipped, prefix.gather(-1, high) - prefix.gather(-1, low)

    inverse = v.reciprocal()
    breakpoints = torch.cat([inverse * lo, inverse * hi], -1)
    if not isinstance(invalid, float):
        breakpoints = breakpoints.nan_to_num(posinf=0.0)  # invalid zeros give s = 0: harmless
    clipped, middle = sets(breakpoints)
    start = torch.where(clipped + breakpoints * middle <= count, breakpoints, 0.0).amax(-1, keepdim=True)
    # end = inf only when start is the last breakpoint (hi = 1): then every s ≥ start gives all ones, s = start.
    end = torch.where(breakpoints > start, breakpoints, torch.inf).amin(-1, keepdim=True)
    # Classify at the middle of the segment, not at its ends: lo/(lo/v) need not round back to v, and tied v
    # would then land on the wrong side.
    clipped, middle = sets((start + end) / 2)
    s = ((count - clipped) / middle.clamp_min(_TINY)).clamp(start, end)
    return (s * v).clamp(lo, hi)


def ramp(step: int, lam: float, warmup_steps: int) -> float:
    """λ at optimizer step ``step``: rises linearly from 0 to ``lam`` over ``warmup_steps`` steps, then stays."""
    if warmup_steps <= 0:
        return lam
    return lam * min(1.0, step / warmup_steps)
