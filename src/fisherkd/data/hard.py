"""HARD: an augmenter trained to make the teacher and the student disagree, within bounds.

Nix, Burg & Sinz, "HARD: Hard Augmentations for Robust Distillation", 2023, arXiv:2305.14890. A small spatial
transformer A_φ maps each training input x to A_φ(x), an affine warp whose parameters it predicts from x and a
noise vector. Teacher t and student s both see A_φ(x) (the same augmented input), and the two play a game:

    augmenter:  max_φ  KL(p_t(A_φ(x)) ‖ p_s(A_φ(x)))       (its own optimizer, every ``every`` student steps)
    student:    min_θ  the configured distillation loss on A_φ(x)   (φ fixed)

with p = softmax(z/τ). The warp stays within bounds whatever φ is: every parameter is ``bound · tanh(·)``, so a
shift never exceeds ``translate`` of the width, the scale stays in [1 − ``scale``, 1 + ``scale``] and a rotation
(images) within ±``rotate`` degrees. Images (B, C, H, W) get translation, scale and rotation; 1-D signals (B, L)
or (B, C, L) the 1-D analogue, a shift and a stretch along the length. The last layer starts at zero, so the
augmenter starts as the identity and learns what to do. The teacher is never updated and stays in eval mode.

The authors' full recipe (update schedule, learning rate, bounds) was not available to us: the defaults below
are ours, chosen small (shift ≤ 1/8 of the width, scale ±20%, rotation ±15°, Adam at 1e-3, one augmenter
update per student step).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from fisherkd.core import call_model, model_logits

POOLED_1D = 16  # the augmenter's view of a signal: average-pooled to this length (and 8×8 for images)
POOLED_2D = 8


class HardConfig(BaseModel):
    """``train.augment.hard``: the learned adversarial augmenter (off when absent)."""

    model_config = ConfigDict(extra="forbid")

    translate: float = Field(0.125, ge=0.0, le=1.0, description="largest shift, as a fraction of the width/length")
    scale: float = Field(0.2, ge=0.0, lt=1.0, description="largest zoom: the scale factor stays in [1-scale, 1+scale]")
    rotate: float = Field(15.0, ge=0.0, le=180.0, description="largest rotation in degrees (images only)")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="the augmenter's own optimizer")
    lr: float = Field(1e-3, gt=0.0, description="the augmenter's learning rate")
    every: int = Field(1, ge=1, description="student optimizer steps per augmenter update")
    temperature: float = Field(1.0, gt=0.0, description="τ of the disagreement KL(p_t ‖ p_s) the augmenter maximises")
    hidden: int = Field(32, ge=1, description="width of the augmenter's hidden layer")
    noise_dim: int = Field(8, ge=0, description="per-sample noise inputs, so equal inputs get different warps")


def disagreement(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p_t ‖ p_s) = Σ_c p_t,c (log p_t,c − log p_s,c) at temperature τ, batch mean (computed in fp32)."""
    log_t = F.log_softmax(teacher_logits.float() / temperature, -1)
    log_s = F.log_softmax(student_logits.float() / temperature, -1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def warp(x: Tensor, params: Tensor) -> Tensor:
    """Apply one affine warp per sample, bicubic with zero padding. (Bilinear sampling has a kink at every pixel
    position, the identity included, where its gradient is one-sided and an ascent step can lower the KL; the cubic
    kernel is smooth there and still reproduces the input exactly at zero parameters.)

    1-D inputs (B, L) or (B, C, L): ``params`` is (B, 2) = (shift, scale − 1); output position u reads the input
    at s·u + 2·shift in normalised coordinates [−1, 1], i.e. the content moves by ``shift`` of the length and is
    stretched by 1/s. Images (B, C, H, W): ``params`` is (B, 4) = (shift_x, shift_y, scale − 1, angle in radians).
    All zeros is the identity.
    """
    if x.dim() == 4:
        shift_x, shift_y, stretch, angle = params.float().unbind(-1)
        s = 1.0 + stretch
        cos, sin = torch.cos(angle) * s, torch.sin(angle) * s
        theta = torch.stack(
            [torch.stack([cos, -sin, 2 * shift_x], -1), torch.stack([sin, cos, 2 * shift_y], -1)], -2
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x.float(), grid, mode="bicubic", align_corners=False).to(x.dtype)
    if x.dim() not in (2, 3):
        raise ValueError(f"HARD warps signals (B, L), (B, C, L) or images (B, C, H, W), not shape {tuple(x.shape)}")
    signal = x.float().reshape(x.shape[0], -1, 1, x.shape[-1])  # a 1-pixel-high image
    shift, stretch = params.float().unbind(-1)
    zero, one = torch.zeros_like(shift), torch.ones_like(shift)
    theta = torch.stack([torch.stack([1.0 + stretch, zero, 2 * shift], -1), torch.stack([zero, one, zero], -1)], -2)
    grid = F.affine_grid(theta, list(signal.shape), align_corners=False)
    return F.grid_sample(signal, grid, mode="bicubic", align_corners=False).reshape(x.shape).to(x.dtype)


class HardAugmenter(nn.Module):
    """The spatial transformer: pooled input + noise → MLP → bounded warp parameters → :func:`warp`."""

    def __init__(self, input_shape: tuple[int, ...], config: HardConfig) -> None:
        super().__init__()
        self.image = len(input_shape) == 3
        channels = input_shape[0] if len(input_shape) >= 2 else 1
        features = channels * (POOLED_2D**2 if self.image else POOLED_1D)
        self.noise_dim = config.noise_dim
        bounds = [config.translate, config.scale]
        if self.image:
            bounds = [config.translate, config.translate, config.scale, math.radians(config.rotate)]
        self.register_buffer("bounds", torch.tensor(bounds))
        self.net = nn.Sequential(
            nn.Linear(features + config.noise_dim, config.hidden), nn.ReLU(), nn.Linear(config.hidden, len(bounds))
        )
        nn.init.zeros_(self.net[-1].weight)  # the identity warp at the start
        nn.init.zeros_(self.net[-1].bias)

    def params(self, x: Tensor) -> Tensor:
        """Per-sample warp parameters, each within ±its bound (tanh never reaches ±1)."""
        view = x.float().detach()  # the warp parameters depend on x; gradients reach φ through the net and warp
        if self.image:
            view = F.adaptive_avg_pool2d(view, POOLED_2D)
        else:
            view = F.adaptive_avg_pool1d(view.reshape(x.shape[0], -1, x.shape[-1]), POOLED_1D)
        inputs = [view.flatten(1)]
        if self.noise_dim:
            inputs.append(torch.randn(x.shape[0], self.noise_dim, device=x.device))
        return self.bounds * torch.tanh(self.net(torch.cat(inputs, 1)))

    def forward(self, x: Tensor) -> Tensor:
        return warp(x, self.params(x))


@contextlib.contextmanager
def _kept_buffers(module: nn.Module):
    """Restore the module's buffers (batch-norm statistics) after an extra forward pass."""
    saved = [b.detach().clone() for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(module.buffers(), saved):
                buffer.copy_(value)


class HardAugmentation:
    """The augmenter, its optimizer and its update; owned by the engine's Trainer (not by the Distiller, whose
    optimizer would otherwise minimise what this one maximises)."""

    def __init__(self, config: HardConfig, input_shape: tuple[int, ...], device: torch.device | str = "cpu") -> None:
        self.config = config
        self.augmenter = HardAugmenter(input_shape, config).to(device)
        params = list(self.augmenter.parameters())
        if config.optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=config.lr)
        else:
            self.optimizer = torch.optim.SGD(params, lr=config.lr)

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        """The augmented batch the teacher and the student train on (φ fixed)."""
        return self.augmenter(x)

    def update(
        self,
        teacher: nn.Module,
        student: nn.Module,
        x: Tensor,
        context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> Tensor:
        """One ascent step of φ on KL(p_t(A_φ(x)) ‖ p_s(A_φ(x))); returns that KL before the step (detached).

        Neither model's parameters get gradients (only φ's are asked for) and the student's buffers are restored,
        so this extra pass leaves the student's own step as it would have been. ``context`` is entered around the
        two forward passes (the engine's autocast). Under DDP the augmenter's gradient is averaged over ranks.
        """
        params = list(self.augmenter.parameters())
        with _kept_buffers(student):  # restored after the backward pass, which reads them
            augmented = self.augmenter(x)
            with context():
                teacher_logits = model_logits(call_model(teacher, augmented))
                student_logits = model_logits(call_model(student, augmented))
            kl = disagreement(student_logits, teacher_logits, self.config.temperature)
            grads = torch.autograd.grad(-kl, params)
        for p, g in zip(params, grads):
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(g)
                g /= dist.get_world_size()
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return kl.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"augmenter": self.augmenter.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.augmenter.load_state_dict(state["augmenter"])
        self.optimizer.load_state_dict(state["optimizer"])
