"""Fisher-information weighting: estimators of the teacher's Fisher, one normalization operator, EMA state.

- :mod:`fisherkd.fisher.estimators` — closed forms (logits, linear head) and one-backward sampled estimates at
  any tapped activation (channels, positions, tokens, attention heads) or at the parameters.
- :func:`normalize` — raw importances → weights with mean 1 (γ = 0 or λ = 0: all ones).
- :class:`EMAStatistic` — bias-corrected EMA, all-reduced under DDP, saved in checkpoints.
- :class:`FisherSpec` — the ``fisher:`` block of a method; :class:`FisherWeighter` — the Distiller's module
  that turns it into ``MethodInputs.weights`` every step.
- :data:`AXES` — one :class:`FisherAxis` record per axis (sample, class, channel, ...): what each one estimates
  and how; adding an axis is adding a record.
"""

from fisherkd.fisher.axes import AXES, FisherAxis
from fisherkd.fisher.normalize import normalize, ramp
from fisherkd.fisher.spec import FisherSpec
from fisherkd.fisher.state import EMAStatistic, all_reduce_mean
from fisherkd.fisher.weighter import FisherBatch, FisherWeighter, mark_mixed_inputs, weight_stats

__all__ = [
    "AXES",
    "EMAStatistic",
    "FisherAxis",
    "FisherBatch",
    "FisherSpec",
    "FisherWeighter",
    "all_reduce_mean",
    "normalize",
    "ramp",
    "mark_mixed_inputs",
    "weight_stats",
]
