"""Paired comparisons for studies: every arm is run with the same seeds, and arms are compared seed by seed.

A difference between two recipes is reported as the mean of the per-seed differences with its 95% interval
(Student's t with n − 1 degrees of freedom): pairing removes the variation that the seed puts into both arms
(the data order, the initialisation), which a comparison of two means ± std leaves in.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

# Two-sided 95% quantiles t_{0.975, df} of Student's t (df = 1..30); beyond, the normal 1.96 is within 2%.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: the half-width of a 95% interval is this times the standard error."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 paired values (df ≥ 1), got df={df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass(frozen=True)
class PairedDifference:
    """mean(a − b) over seeds, its 95% interval [low, high] and the number of pairs."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def paired_difference(a: Sequence[float], b: Sequence[float]) -> PairedDifference:
    """The mean of a_i − b_i (the same seed i in both) with its 95% t interval."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same seeds: {len(a)} vs {len(b)} values")
    diffs = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(diffs)
    half = t_quantile_975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return PairedDifference(mean, mean - half, mean + half, len(diffs))
