"""The ``fisher:`` block of a method spec: which axis to weight, how to estimate the teacher's Fisher there, and
the normalization and schedule of the weights."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fisherkd.core import nearest
from fisherkd.fisher.axes import AXES
from fisherkd.fisher.metric import DIRECTIONS


class FisherSpec(BaseModel):
    """Fisher weighting of one method's loss along one axis. Only ``axis`` is required.

    YAML (in a method entry)::

        - name: fitnet
          pairs: [[features, features]]
          fisher: {axis: channel, estimator: linear_head, gamma: 0.5}

    Estimators: ``logit`` (closed form at the teacher's logits: p(1 − p) per class, 1 − ‖p‖² per sample or token),
    ``linear_head`` (closed form at the input of the teacher's linear classifier ``head``), ``sampled`` (one
    backward of log p(ŷ) with ŷ drawn from the teacher, to the activation ``tap``), ``empirical`` (the same with
    the ground-truth labels); sample axis: ``wsl`` (the student-aware weight of WSL, Zhou et al., ICLR 2021,
    1 − exp(−CE_s/CE_t), see :func:`fisherkd.fisher.estimators.wsl_weight`) and ``influence`` (KD-AIF, Wu et al.
    2025: σ of each sample's influence on the rest of the batch's loss, the teacher's Fisher, damped by ``damping``,
    as the curvature; see :func:`fisherkd.fisher.estimators.influence_weight`); class axis: ``non_target`` (the
    teacher's relative non-target probabilities, DKD-like, see :func:`fisherkd.fisher.estimators.non_target`).
    Every estimator reads the teacher's softmax at ``temperature``. ``mixed: off`` leaves a per-batch axis
    unweighted while the engine mixes its batches (mixup: the teacher's Fisher on a mixed input peaks on the most
    mixed inputs, not on hard samples). Weights are ``normalize(statistic, gamma, lam)`` (see
    :func:`fisherkd.fisher.normalize`), mean 1 along the axis; gamma = 0 or lam = 0 is the unweighted method.

    Axis ``direction`` (FitNet hints) weights the hint by a C×C metric instead: ``{axis: direction, directions:
    fisher | complement | row | null, energy: 0.95, rank: null, isotropic: 0.1}`` (see :mod:`fisherkd.fisher.metric`;
    row and null read only the head's weight and estimate nothing).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    axis: str = Field(description="what to weight: sample, class, channel, position, head, token, parameter, direction")
    estimator: str | None = Field(None, description="default: logit for sample/class, else sampled")
    tap: str | None = Field(None, description="teacher tap of the activation Fisher; default: the method's first pair")
    head: str | None = Field(None, description="teacher's linear classifier for linear_head; default: its last Linear")
    num_heads: int | None = Field(None, ge=1, description="heads of a B×T×D context tap (head axis)")
    temperature: float = Field(1.0, gt=0, description="of the teacher's softmax in the estimators")
    gamma: float = Field(
        1.0, description="exponent on the importances: 0 = uniform, <1 flattens, >1 sharpens; < 0 (axis sample "
        "only) favours the least important: the confident samples"
    )
    lam: float = Field(1.0, ge=0, le=1, description="mix with uniform weights: w = (1 − lam) + lam·u/mean u")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps over which lam rises linearly from 0")
    every: int = Field(4, ge=1, description="EMA axes: update the statistic every this many optimizer steps")
    fraction: float = Field(0.25, gt=0, le=1, description="EMA axes: share of the batch used by an update")
    ema: float = Field(0.99, ge=0, lt=1, description="EMA decay of the statistic (bias-corrected)")
    freeze_after: int | None = Field(None, ge=0, description="EMA axes: stop updating after this many steps")
    floor: float = Field(1e-3, ge=0, description="importances below floor·mean are raised to it")
    clip: tuple[float, float] = Field((0.1, 10.0), description="bounds of the weights (lo <= 1 <= hi)")
    damping: float = Field(
        0.01, gt=0, description="sample axis, influence estimator: F + damping·(mean eigenvalue of F)·I"
    )
    mixed: Literal["estimate", "off"] = Field(
        "estimate", description="per-batch axes, when the engine mixes the batch (mixup): estimate on it, or off"
    )
    # axis direction only (a C×C metric, see fisherkd.fisher.metric)
    directions: str = Field("fisher", description="direction axis: fisher, complement, row or null")
    energy: float = Field(0.95, gt=0, le=1, description="direction axis: share of the Fisher's trace kept")
    rank: int | None = Field(None, ge=1, description="direction axis: at most this many Fisher directions")
    isotropic: float = Field(0.1, ge=0, description="direction axis: ε of the ε·I/C term that pins the rest")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    raise ValueError(f"fisher: unknown key {key!r}; {nearest(key, list(cls.model_fields))}")
        return data

    @field_validator("axis")
    @classmethod
    def _known_axis(cls, axis: str) -> str:
        if axis not in AXES:
            raise ValueError(f"fisher: unknown axis {axis!r}; {nearest(axis, list(AXES))}")
        return axis

    @model_validator(mode="after")
    def _consistent(self) -> FisherSpec:
        allowed = AXES[self.axis].estimators
        if self.estimator is not None and self.estimator not in allowed:
            raise ValueError(
                f"fisher: axis {self.axis!r} takes the estimators {', '.join(allowed)}, not {self.estimator!r}"
            )
        # by value, not by what was written: a saved config holds every field, at its default where unset
        defaults = {k: f.default for k, f in type(self).model_fields.items()}
        metric_keys = [k for k in ("directions", "energy", "rank", "isotropic") if getattr(self, k) != defaults[k]]
        if metric_keys and self.axis != "direction":
            raise ValueError(f"fisher: {', '.join(metric_keys)} apply to axis direction only, not {self.axis!r}")
        if self.directions not in DIRECTIONS:
            raise ValueError(f"fisher: unknown directions {self.directions!r}; {nearest(self.directions, DIRECTIONS)}")
        if self.damping != defaults["damping"] and self.resolved_estimator != "influence":
            raise ValueError(
                f"fisher: damping applies to estimator influence only, not {self.resolved_estimator!r}; drop damping "
                "or set estimator: influence"
            )
        if self.gamma < 0 and self.axis != "sample":
            raise ValueError(f"fisher: gamma < 0 applies to axis sample only, not {self.axis!r}; use gamma >= 0")
        if self.mixed != defaults["mixed"] and not AXES[self.axis].per_batch:
            raise ValueError(f"fisher: mixed applies to the per-batch axes sample, position, token; not {self.axis!r}")
        lo, hi = self.clip
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f"fisher: clip must satisfy 0 < lo <= 1 <= hi, got {list(self.clip)}")
        return self

    @property
    def resolved_estimator(self) -> str:
        return self.estimator or AXES[self.axis].estimators[0]

    @property
    def active(self) -> bool:
        """False when the weights are all ones by construction (gamma = 0 or lam = 0): nothing is estimated."""
        return self.gamma != 0 and self.lam > 0
