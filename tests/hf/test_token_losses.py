"""Token-level LM distillation: values and gradients against the batch functions of functional/logits.py,
masking and shifting as Hugging Face, exact gradient accumulation, vocabulary checks, and a tiny GPT-2 run."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import fisherkd.functional as F
from fisherkd.hf import DIVERGENCES, token_distillation_loss
from fisherkd.hf.token_losses import CHUNK_BYTES, chunk_rows

# (divergence, beta, alpha): both ends of every skew weight, where the closed-form gradients skip terms, and JSD
# close to its ends (β ∈ {0, 1} is refused, see test_jsd_is_trl_generalized_jsd_per_token)
CASES = [
    ("forward_kl", 0.5, 0.1),
    ("reverse_kl", 0.5, 0.1),
    ("tvd", 0.5, 0.1),
    ("jsd", 0.5, 0.1),
    ("jsd", 1e-3, 0.1),
    ("jsd", 0.3, 0.1),
    ("jsd", 1 - 1e-3, 0.1),
    ("skew_kl", 0.5, 0.1),
    ("skew_kl", 0.5, 0.0),
    ("skew_kl", 0.5, 1.0),
    ("skew_reverse_kl", 0.5, 0.1),
    ("skew_reverse_kl", 0.5, 0.0),
    ("skew_reverse_kl", 0.5, 1.0),
]


def functional_loss(s: Tensor, t: Tensor, divergence: str, tau: float, beta: float, alpha: float, weight=None):
    """The batch mean over rows of the same-named function in functional/logits.py."""
    kw = {"temperature": tau, "sample_weight": weight}
    loss = {
        "forward_kl": lambda: F.kd(s, t, **kw),
        "reverse_kl": lambda: F.reverse_kl(s, t, **kw),
        "jsd": lambda: F.jsd(s, t, beta=beta, **kw),
        "tvd": lambda: F.tvd(s, t, **kw),
        "skew_kl": lambda: F.skew_kl(s, t, alpha=alpha, **kw),
        "skew_reverse_kl": lambda: F.skew_reverse_kl(s, t, alpha=alpha, **kw),
    }[divergence]()
    return loss + 0.0 * s.sum()  # skew_kl at α = 1 does not depend on the student at all


def naive(zs, zt, labels, divergence, tau=1.0, beta=0.5, alpha=0.1, token_weight=None, num_items=None):
    """Full materialisation: shift, keep the valid tokens, apply the functional loss with autograd."""
    valid = torch.zeros_like(labels, dtype=torch.bool)
    valid[:, :-1] = labels[:, 1:] != -100
    n = int(valid.sum())
    w = None if token_weight is None else token_weight[valid]
    return functional_loss(zs[valid], zt[valid], divergence, tau, beta, alpha, w) * n / (num_items or n)


def make(b=3, t=9, v=13, dtype=torch.float64, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    zs = (scale * torch.randn(b, t, v, generator=g)).to(dtype).requires_grad_()
    zt = (scale * torch.randn(b, t, v, generator=g)).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :4] = -100  # a masked prompt
    labels[1, -3:] = -100  # right padding
    return zs, zt, labels


def value_and_grad(fn, zs):
    loss = fn()
    (grad,) = torch.autograd.grad(loss, zs)
    return loss.detach(), grad


@pytest.mark.parametrize(("divergence", "beta", "alpha"), CASES)
@pytest.mark.parametrize("chunk_size", [4, 1000])
def test_matches_functional_per_token(divergence, beta, alpha, chunk_size):
    zs, zt, labels = make()
    tau = 2.0
    weight = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    for w in (None, weight):
        ours = value_and_grad(
            lambda w=w: token_distillation_loss(
                zs, zt, labels, divergence, tau, beta=beta, alpha=alpha, chunk_size=chunk_size, token_weight=w
            ),
            zs,
        )
        ref = value_and_grad(lambda w=w: naive(zs, zt, labels, divergence, tau, beta, alpha, w), zs)
        torch.testing.assert_close(ours[0], ref[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours[1], ref[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_logits_stay_finite_and_exact(divergence):
    zs, zt, labels = make(scale=60.0, seed=3)  # probabilities down to e^-300: ratios must not overflow
    ours = value_and_grad(lambda: token_distillation_loss(zs, zt, labels, divergence, 1.0, chunk_size=5), zs)
    ref = value_and_grad(lambda: naive(zs, zt, labels, divergence), zs)
    assert torch.isfinite(ours[1]).all()
    torch.testing.assert_close(ours[0], ref[0])
    torch.testing.assert_close(ours[1], ref[1])


# reverse KL is left out: where the teacher gives a token probability 0 and the student does not, it is infinite
@pytest.mark.parametrize("divergence", [d for d in DIVERGENCES if d != "reverse_kl"])
def test_minus_infinity_logits_are_zero_probabilities(divergence):
    zs, zt, labels = make(seed=5)
    masked = zt.clone()
    masked[..., :3] = -torch.inf  # e.g. tokens a generation constraint forbids
    finite = zt.clone()
    finite[..., :3] = -1e4
    value, grad = value_and_grad(lambda: token_distillation_loss(zs, masked, labels, divergence), zs)
    expected = value_and_grad(lambda: token_distillation_loss(zs, finite, labels, divergence), zs)
    torch.testing.assert_close(value, expected[0])
    torch.testing.assert_close(grad, expected[1])


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs(divergence, dtype):
    zs64, zt64, labels = make(b=2, t=11, v=37, seed=4)
    zs = zs64.detach().to(dtype).requires_grad_()
    zt = zt64.detach().to(dtype)
    ours = value_and_grad(lambda: token_distillation_loss(zs, zt, labels, divergence, 1.5, chunk_size=3), zs)
    ref = value_and_grad(lambda: naive(zs, zt, labels, divergence, 1.5), zs)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype  # fp32 math, gradient in the logits' dtype
    torch.testing.assert_close(ours[0], ref[0].float(), rtol=1e-5, atol=1e-6)
    # the naive gradient is rounded to bf16 through .float()'s backward as well: compare at bf16 resolution
    tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-4}
    torch.testing.assert_close(ours[1].float(), ref[1].float(), **tol)


def test_shift_drops_last_logit_and_first_label():
    zs, zt, labels = make()
    shifted = token_distillation_loss(zs, zt, labels, temperature=2.0)
    unshifted = token_distillation_loss(zs[:, :-1], zt[:, :-1], labels[:, 1:], temperature=2.0, shift=False)
    torch.testing.assert_close(shifted, unshifted)
    (grad,) = torch.autograd.grad(shifted, zs)
    assert grad[:, -1].abs().sum() == 0  # the last position predicts nothing
    assert grad[0, :3].abs().sum() == 0  # positions whose next label is masked


def test_gradient_accumulation_with_num_items_is_exact():
    zs, zt, labels = make(b=4)
    labels[2, 2:] = -100  # micro-batches with very different token counts
    num_items = int((labels[:, 1:] != -100).sum())  # what Hugging Face passes as num_items_in_batch
    whole = value_and_grad(lambda: token_distillation_loss(zs, zt, labels, "jsd"), zs)
    parts = value_and_grad(
        lambda: sum(
            token_distillation_loss(zs[i : i + 2], zt[i : i + 2], labels[i : i + 2], "jsd", num_items=num_items)
            for i in (0, 2)
        ),
        zs,
    )
    torch.testing.assert_close(parts[0], whole[0])
    torch.testing.assert_close(parts[1], whole[1])


def test_sum_reduction_and_all_masked():
    zs, zt, labels = make()
    count = int((labels[:, 1:] != -100).sum())
    mean = token_distillation_loss(zs, zt, labels, "reverse_kl")
    torch.testing.assert_close(token_distillation_loss(zs, zt, labels, "reverse_kl", reduction="sum"), mean * count)
    masked = torch.full_like(labels, -100)
    loss = token_distillation_loss(zs, zt, masked)
    loss.backward()
    assert loss.item() == 0.0 and zs.grad.abs().sum() == 0


def test_backward_scales_by_upstream_gradient_once():
    zs, zt, labels = make()
    (base,) = torch.autograd.grad(token_distillation_loss(zs, zt, labels), zs)
    (scaled,) = torch.autograd.grad(3.0 * token_distillation_loss(zs, zt, labels), zs)
    torch.testing.assert_close(scaled, 3.0 * base)
    loss = token_distillation_loss(zs, zt, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def test_no_gradient_needed():
    zs, zt, labels = make()
    with torch.no_grad():
        value = token_distillation_loss(zs, zt, labels, "tvd")
    torch.testing.assert_close(value, token_distillation_loss(zs.detach(), zt, labels, "tvd"))
    assert not value.requires_grad


def test_vocab_mismatch_and_truncation():
    zs, zt, labels = make(v=13)
    zt_big = torch.cat([zt, torch.randn(*zt.shape[:-1], 3, dtype=zt.dtype)], dim=-1)  # padded teacher embedding
    with pytest.raises(ValueError, match=r"13.*16.*vocab_truncation=True"):
        token_distillation_loss(zs, zt_big, labels)
    truncated = token_distillation_loss(zs, zt_big, labels, vocab_truncation=True)
    torch.testing.assert_close(truncated, token_distillation_loss(zs, zt, labels))
    # a wider student: its extra logits take no part and get no gradient
    zs_big = torch.cat([zs.detach(), torch.randn(*zs.shape[:-1], 3, dtype=zs.dtype)], dim=-1).requires_grad_()
    (grad,) = torch.autograd.grad(token_distillation_loss(zs_big, zt, labels, vocab_truncation=True), zs_big)
    (expected,) = torch.autograd.grad(token_distillation_loss(zs, zt, labels), zs)
    torch.testing.assert_close(grad[..., :13], expected)
    assert grad[..., 13:].abs().sum() == 0


def test_input_checks():
    zs, zt, labels = make()
    with pytest.raises(ValueError, match="unknown divergence"):
        token_distillation_loss(zs, zt, labels, "kl")
    with pytest.raises(ValueError, match="beta"):
        token_distillation_loss(zs, zt, labels, "jsd", beta=1.5)
    with pytest.raises(ValueError, match=r"did you mean: forward_kl"):
        token_distillation_loss(zs, zt, labels, "forward-kl")
    with pytest.raises(ValueError, match="labels"):
        token_distillation_loss(zs, zt, labels[:, 1:])
    with pytest.raises(ValueError, match="token_weight"):
        token_distillation_loss(zs, zt, labels, token_weight=torch.ones(3))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive number of tokens"):
            token_distillation_loss(zs, zt, labels, chunk_size=bad)


def test_tiny_gpt2_distillation_trains():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    vocab = 97
    teacher = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_layer=2, n_embd=32, n_head=2)
    ).eval()
    student = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_layer=1, n_embd=16, n_head=2)
    )
    input_ids = torch.randint(1, vocab, (4, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0  # right padding
    attention_mask[3, 6:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100  # the prompt is not distilled
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        logits = student(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = token_distillation_loss(logits, teacher_logits, labels, "jsd", 2.0, chunk_size=7)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses


def trl_jsd_per_token(zs: Tensor, zt: Tensor, labels: Tensor, beta: float, tau: float) -> Tensor:
    """TRL's generalized_jsd_loss written out with torch's own kl_div (F.kl_div(log M, log p) = KL(p ‖ M)),
    masked and shifted as Hugging Face, mean over the valid tokens."""
    valid = torch.zeros_like(labels, dtype=torch.bool)
    valid[:, :-1] = labels[:, 1:] != -100
    log_s = torch.log_softmax(zs[valid] / tau, -1)
    log_t = torch.log_softmax(zt[valid] / tau, -1)
    beta_t = torch.tensor(beta, dtype=log_s.dtype)
    log_m = torch.logsumexp(torch.stack([log_s + torch.log1p(-beta_t), log_t + torch.log(beta_t)]), dim=0)
    kl_teacher = torch.nn.functional.kl_div(log_m, log_t, reduction="none", log_target=True).sum(-1)
    kl_student = torch.nn.functional.kl_div(log_m, log_s, reduction="none", log_target=True).sum(-1)
    return (beta * kl_teacher + (1 - beta) * kl_student).mean()


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_is_trl_generalized_jsd_per_token(beta):
    zs, zt, labels = make()
    ours = value_and_grad(lambda: token_distillation_loss(zs, zt, labels, "jsd", 2.0, beta=beta, chunk_size=5), zs)
    ref = value_and_grad(lambda: trl_jsd_per_token(zs, zt, labels, beta, 2.0), zs)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_end_points_name_the_kl_to_use(beta):
    zs, zt, labels = make()
    with pytest.raises(ValueError, match=r"0 < beta < 1.*'forward_kl'.*'reverse_kl'"):
        token_distillation_loss(zs, zt, labels, "jsd", beta=beta)


def test_default_chunks_are_sized_in_bytes(monkeypatch):
    # 8 MiB of fp32 per [chunk × V] work tensor whatever V (not 256 tokens: 31 MiB at V = 32,000, which glibc keeps
    # on its heap after freeing, see benchmarks/token_loss_memory.py)
    for vocab in (13, 32000, 50257, 256000):
        tokens = chunk_rows(None, vocab)
        assert tokens * vocab * 4 <= CHUNK_BYTES < (tokens + 1) * vocab * 4
    assert chunk_rows(None, 32000) == 65 and chunk_rows(None, 10**7) == 1 and chunk_rows(7, 32000) == 7
    # the loss uses that default: with a budget of 5 tokens × 13 classes, one divergence call per 5 tokens
    import fisherkd.hf.token_losses as module

    monkeypatch.setattr(module, "CHUNK_BYTES", 5 * 13 * 4)
    calls = []
    divergence_and_h = module.divergence_and_h
    monkeypatch.setattr(
        module, "divergence_and_h", lambda *a, **k: calls.append(a[0].shape[0]) or divergence_and_h(*a, **k)
    )
    zs, zt, labels = make(v=13)
    token_distillation_loss(zs, zt, labels, "reverse_kl").backward()
    count = int((labels[:, 1:] != -100).sum())
    assert calls == [5] * (count // 5) + ([count % 5] if count % 5 else [])
