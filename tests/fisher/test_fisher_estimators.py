"""Each closed form against a Monte-Carlo estimate of E[g²] (tolerance: 5 standard errors of the MC mean, from
the draws themselves), the head-gate identity against an explicit gate, the parameter Fisher's unbiasedness, and
the teacher staying frozen."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisherkd.fisher import estimators as E
from fisherkd.models import create_model
from helpers import TinyCNN


def assert_mc_close(draws: torch.Tensor, expected: torch.Tensor, scale: float = 1.0) -> None:
    """mean of the draws (first axis) equals ``expected``/scale within 5 standard errors (+ a float floor)."""
    mean, se = draws.mean(0), draws.std(0) / draws.shape[0] ** 0.5
    error = (mean * scale - expected).abs()
    assert (error <= 5 * se * scale + 1e-6).all(), f"max error {error.max():.3g}, 5 SE {5 * se.max() * scale:.3g}"


def test_logit_closed_forms_match_monte_carlo_scores():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, generator=g) * 2
    for tau in (1.0, 3.0):
        draws = 40_000
        logits = z.repeat(draws, 1).requires_grad_()
        labels = torch.multinomial(F.softmax(z / tau, -1), draws, replacement=True, generator=g)
        # score of the softened distribution with respect to u = z/τ (the Fisher of softmax(u))
        log_p = F.log_softmax(logits / tau, -1).gather(1, labels[:, None]).sum()
        score = torch.autograd.grad(log_p, logits)[0] * tau
        assert_mc_close(score.pow(2), E.logit_fisher_diagonal(z, tau))
        assert_mc_close(score.pow(2).sum(1, keepdim=True), E.logit_fisher_trace(z, tau).reshape(1))


def test_linear_head_closed_form_matches_sampled_scores_at_the_head_input():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).requires_grad_(False)
    x = torch.randn(1, 6)
    draws = x.repeat(20_000, 1)
    generator = torch.Generator().manual_seed(1)
    for tau in (1.0, 2.0):
        ((h, grad),) = E.tapped_gradients(teacher, draws, ["2:in"], temperature=tau, generator=generator)
        closed = E.linear_head_fisher(teacher(x), teacher[2].weight, tau)[0]
        assert_mc_close(grad.pow(2), closed, scale=tau**2)  # the score of softmax(z/τ) carries a factor 1/τ


def test_channel_fisher_of_a_pooled_map_is_the_head_closed_form_over_positions_squared():
    torch.manual_seed(0)
    teacher = TinyCNN(width=4).eval().requires_grad_(False)  # block2 (8 channels, 8×8) → average pool → head
    x = torch.randn(1, 3, 8, 8)
    generator = torch.Generator().manual_seed(2)
    ((_, grad),) = E.tapped_gradients(teacher, x.repeat(20_000, 1, 1, 1), ["block2"], generator=generator)
    per_unit = E.linear_head_fisher(teacher(x), teacher.head.weight)
    closed = E.channel_fisher(E.head_input_layout(per_unit, (1, 8, 8, 8)))[0]
    assert_mc_close(E.channel_fisher(grad.pow(2)), closed, scale=64**2)  # h = mean of 64 positions


def test_flattened_map_layout_and_in_place_layers_after_the_tap():
    torch.manual_seed(0)
    teacher = create_model("cnn1d", 1, 10).eval().requires_grad_(False)  # features.5 (ReLU, 25×4) → flatten → head
    x = torch.randn(1, 40)
    generator = torch.Generator().manual_seed(3)
    ((value, grad),) = E.tapped_gradients(teacher, x.repeat(20_000, 1), ["features.5"], generator=generator)
    closed = E.head_input_layout(E.linear_head_fisher(teacher(x), teacher.head.weight), value.shape)[0]
    assert_mc_close(grad.pow(2).flatten(1), closed.flatten())
    assert_mc_close(E.position_fisher(grad.pow(2)), E.position_fisher(closed[None])[0])
    # a tap followed by ReLU(inplace=True) still works (the tapped leaf is never modified in place)
    ((conv, grad),) = E.tapped_gradients(teacher, x.repeat(4, 1), ["features.4"], generator=generator)
    assert conv.shape == grad.shape == (4, 25, 5) and (conv < 0).any()
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())


def gate_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, hook_on: str, make_hook) -> torch.Tensor:
    """∂ log p(y|x)/∂ξ at ξ = 1 for an explicit per-sample, per-head gate ξ [B, H] inserted by a hook."""
    gate = torch.ones(x.shape[0], 4, requires_grad=True)
    module = dict(model.named_modules())[hook_on]
    handle = make_hook(module, gate)
    with torch.enable_grad():
        log_p = F.log_softmax(model(x), -1).gather(1, y[:, None]).sum()
        (grad,) = torch.autograd.grad(log_p, gate)
    handle.remove()
    return grad


def test_head_gate_fisher_equals_the_squared_derivative_of_an_explicit_gate():
    torch.manual_seed(0)
    vit = create_model("vit_tiny", 3, 5, dim=16, depth=1, heads=4).eval().requires_grad_(False)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 5, (6,))
    # gate on the attention probabilities of each head (B×H×T×T)
    on_probs = gate_scores(
        vit, x, y, "blocks.0.attn.probs",
        lambda m, gate: m.register_forward_hook(lambda _m, _a, out: out * gate[:, :, None, None]),
    )
    ((value, grad),) = E.tapped_gradients(vit, x, ["blocks.0.attn.probs"], target=y)
    assert torch.allclose(E.head_gate_fisher(value, grad), on_probs.pow(2), rtol=1e-4, atol=1e-8)
    # the same from the B×T×D context entering the output projection, split into 4 heads
    on_context = gate_scores(
        vit, x, y, "blocks.0.attn.proj",
        lambda m, gate: m.register_forward_pre_hook(
            lambda _m, args: (args[0] * gate.repeat_interleave(4, 1)[:, None, :],)
        ),
    )
    ((value, grad),) = E.tapped_gradients(vit, x, ["blocks.0.attn.proj:in"], target=y)
    assert torch.allclose(E.head_gate_fisher(value, grad, num_heads=4), on_context.pow(2), rtol=1e-4, atol=1e-8)
    assert torch.allclose(on_probs, on_context, rtol=1e-4, atol=1e-7)  # o_h is linear in A_h


def test_parameter_fisher_is_unbiased_for_logistic_regression():
    torch.manual_seed(0)
    teacher = nn.Linear(3, 4).requires_grad_(False)
    x = torch.randn(8, 3)
    p = F.softmax(teacher(x), -1)
    # diag of (diag p − ppᵀ) ⊗ x xᵀ, averaged over the batch: F_W[c, j] = mean_n p_c(1 − p_c) x_j², F_b = p_c(1 − p_c)
    expected_w = (p * (1 - p)).T @ x.pow(2) / len(x)
    expected_b = (p * (1 - p)).mean(0)
    generator = torch.Generator().manual_seed(4)
    draws = [E.parameter_fisher(teacher, x, ["weight", "bias"], generator=generator) for _ in range(1500)]
    assert_mc_close(torch.stack([d[0] for d in draws]), expected_w)
    assert_mc_close(torch.stack([d[1] for d in draws]), expected_b)
    assert all(not q.requires_grad and q.grad is None for q in teacher.parameters())


def test_a_tap_off_the_path_to_the_logits_is_a_clear_error():
    class WithProbe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.probe, self.head = nn.Linear(4, 4), nn.Identity(), nn.Linear(4, 3)

        def forward(self, x):
            h = self.body(x)
            self.probe(h)  # computed for inspection, never used
            return self.head(h)

    with pytest.raises(ValueError, match="not on the path"):
        E.tapped_gradients(WithProbe().requires_grad_(False), torch.randn(2, 4), ["probe"])
    with pytest.raises(KeyError, match="did you mean"):
        E.tapped_gradients(WithProbe().requires_grad_(False), torch.randn(2, 4), ["bdy"])
