"""Learned projections that map a student feature to the shape of its teacher counterpart."""

from __future__ import annotations

from torch import Tensor, nn


def make_adapter(student: Tensor, teacher: Tensor, where: str) -> nn.Module:
    """Build the adapter for one tapped pair from the observed shapes (batch dimension ignored).

    Maps (B,C,H,W) → 1×1 Conv2d; (B,C,L) with equal L → 1×1 Conv1d; (B,T,D) with equal T → Linear on D;
    (B,D) → Linear. ``where`` names the pair for the error message.
    """
    s, t = tuple(student.shape[1:]), tuple(teacher.shape[1:])
    if len(s) == len(t) == 1:
        return nn.Linear(s[0], t[0])
    if len(s) == len(t) == 3 and s[1:] == t[1:]:
        return nn.Conv2d(s[0], t[0], kernel_size=1, bias=False)
    if len(s) == len(t) == 2 and s[:-1] == t[:-1]:
        return nn.Linear(s[-1], t[-1])
    if len(s) == len(t) == 2 and s[1:] == t[1:]:
        return nn.Conv1d(s[0], t[0], kernel_size=1, bias=False)
    raise ValueError(
        f"{where}: cannot map student shape {list(student.shape)} to teacher shape {list(teacher.shape)}; "
        "tap layers whose spatial/sequence sizes match (only channels may differ)"
    )
