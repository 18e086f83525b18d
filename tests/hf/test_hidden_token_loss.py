"""The token loss from hidden states and LM heads (no [tokens × V] logits): values and gradients against autograd
through the materialised logits, tied heads, vocabulary truncation, and the trainer's fused path against its logits
path on a tiny tied Llama."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from transformers import TrainingArguments  # noqa: E402

from fisherkd.hf import DistillationConfig, DistillationTrainer  # noqa: E402
from fisherkd.hf.token_losses import hidden_token_distillation_loss, token_distillation_loss  # noqa: E402
from helpers import tiny_llama  # noqa: E402


def naive(h_s, w_s, b_s, h_t, w_t, labels, divergence, beta=0.5, tau=1.0, token_weight=None, num_items=None):
    """Written out from the definitions: logits z = h·Wᵀ + b, shift, keep the valid tokens, per-token divergence
    between softmax(z/τ), weighted sum over the valid tokens / their count (or num_items); τ² on the KLs."""
    z_s = h_s @ w_s.T + (0 if b_s is None else b_s)
    z_t = h_t @ w_t.T
    valid = torch.zeros_like(labels, dtype=torch.bool)
    valid[:, :-1] = labels[:, 1:] != -100
    p_s, p_t = torch.softmax(z_s[valid] / tau, -1), torch.softmax(z_t[valid] / tau, -1)
    if divergence == "forward_kl":
        per = (p_t * (p_t.log() - p_s.log())).sum(-1) * tau**2
    elif divergence == "reverse_kl":
        per = (p_s * (p_s.log() - p_t.log())).sum(-1) * tau**2
    else:  # jsd, GKD's β: M = β·p_t + (1 − β)·p_s
        m = beta * p_t + (1 - beta) * p_s
        per = beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)
    w = torch.ones_like(per) if token_weight is None else token_weight[valid]
    return (w * per).sum() / (num_items or int(valid.sum()))


def make(v_s=11, v_t=11, width=5, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(3, 7, width, generator=g, dtype=torch.float64).requires_grad_()
    w_s = (2 * torch.randn(v_s, width, generator=g, dtype=torch.float64)).requires_grad_()
    b_s = torch.randn(v_s, generator=g, dtype=torch.float64).requires_grad_() if bias else None
    h_t = torch.randn(3, 7, width + 2, generator=g, dtype=torch.float64)
    w_t = 2 * torch.randn(v_t, width + 2, generator=g, dtype=torch.float64)
    labels = torch.randint(0, min(v_s, v_t), (3, 7), generator=g)
    labels[0, :3] = -100  # a masked prompt
    labels[2, -2:] = -100  # right padding
    return h_s, w_s, b_s, h_t, w_t, labels


def grads(loss: Tensor, *inputs: Tensor) -> list[Tensor]:
    return list(torch.autograd.grad(loss, [x for x in inputs if x is not None]))


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_value_and_gradients_match_the_definitions(divergence, chunk_size):
    h_s, w_s, b_s, h_t, w_t, labels = make()
    tau, weight = 2.0, torch.rand(3, 7, dtype=torch.float64) + 0.5
    ours = hidden_token_distillation_loss(
        h_s,
        w_s,
        h_t,
        w_t,
        labels,
        divergence,
        tau,
        student_bias=b_s,
        beta=0.3,
        chunk_size=chunk_size,
        token_weight=weight,
        num_items=20,
    )
    ref = naive(h_s, w_s, b_s, h_t, w_t, labels, divergence, beta=0.3, tau=tau, token_weight=weight, num_items=20)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(grads(ours, h_s, w_s, b_s), grads(ref, h_s, w_s, b_s)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("divergence", ["tvd", "skew_kl", "skew_reverse_kl"])
def test_other_divergences_equal_the_loss_on_materialised_logits(divergence):
    # token_distillation_loss is checked against the definitions in test_token_losses.py
    h_s, w_s, b_s, h_t, w_t, labels = make(v_s=13, v_t=11)
    ours = hidden_token_distillation_loss(
        h_s, w_s, h_t, w_t, labels, divergence, student_bias=b_s, chunk_size=3, vocab_truncation=True
    )
    ref = token_distillation_loss(h_s @ w_s.T + b_s, h_t @ w_t.T, labels, divergence, vocab_truncation=True)
    torch.testing.assert_close(ours, ref)
    got = grads(ours, h_s, w_s, b_s)
    for a, b in zip(got, grads(ref, h_s, w_s, b_s)):
        torch.testing.assert_close(a, b)
    assert (got[1][11:] == 0).all() and (got[2][11:] == 0).all()  # head rows beyond the teacher's vocabulary


def test_tied_head_gradient_adds_the_embedding_gradient():
    h_s, w_s, _, h_t, w_t, labels = make(bias=False)
    ids = labels.clamp_min(0)

    def hidden() -> Tensor:  # the head's weight is also the embedding
        return torch.nn.functional.embedding(ids, w_s).tanh() + h_s

    ours = hidden_token_distillation_loss(hidden(), w_s, h_t, w_t, labels, "jsd")
    ref = naive(hidden(), w_s, None, h_t, w_t, labels, "jsd")
    for a, b in zip(grads(ours, w_s, h_s), grads(ref, w_s, h_s)):
        torch.testing.assert_close(a, b)


def test_checks_and_no_gradient():
    h_s, w_s, b_s, h_t, w_t, labels = make(v_s=13)
    with pytest.raises(ValueError, match="vocabulary size 13 differs"):
        hidden_token_distillation_loss(h_s, w_s, h_t, w_t, labels)
    with pytest.raises(ValueError, match="head weight has shape"):
        hidden_token_distillation_loss(h_s, w_s.T, h_t, w_t, labels)
    with torch.no_grad():
        value = hidden_token_distillation_loss(h_s, w_s, h_t, w_t, labels, vocab_truncation=True)
    assert not value.requires_grad and torch.isfinite(value)
    masked = hidden_token_distillation_loss(h_s, w_s, h_t, w_t, torch.full_like(labels, -100), vocab_truncation=True)
    assert masked == 0 and all((g == 0).all() for g in grads(masked, h_s, w_s))  # no token: zero gradients
    loss = hidden_token_distillation_loss(h_s, w_s, h_t, w_t, labels, vocab_truncation=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def tiny_llama_tied(layers: int, seed: int, **overrides) -> torch.nn.Module:
    return tiny_llama(layers, seed, tie_word_embeddings=True, **overrides)


def test_trainer_fused_path_equals_the_logits_path(tmp_path):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (4, 10), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[3, -2:] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none", save_strategy="no")
    results = []
    for fused in (True, False):
        student, teacher = tiny_llama_tied(1, seed=0), tiny_llama_tied(2, seed=1)
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            distillation=DistillationConfig(token_loss={"divergence": "jsd"}),
            args=args,
            train_dataset=[{k: v[0] for k, v in batch.items()}],
        )
        assert trainer.fused_head  # a tied Llama: plain linear head, no logit scaling
        trainer.fused_head = fused
        loss = trainer.compute_loss(student, dict(batch), num_items_in_batch=int((labels[:, 1:] != -100).sum()))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}))
    (fused_loss, fused_grads), (loss, grads_) = results
    torch.testing.assert_close(fused_loss, loss)
    for name, grad in grads_.items():
        torch.testing.assert_close(fused_grads[name], grad, msg=name)


def test_trainer_keeps_the_logits_path_for_scaled_heads(tmp_path):
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none", save_strategy="no")
    capped = tiny_llama_tied(1, seed=0)
    capped.config.final_logit_softcapping = 30.0  # as Gemma 2: the model's logits are not its head's output
    trainer = DistillationTrainer(
        model=capped,
        teacher_model=tiny_llama_tied(2, seed=1),
        distillation=DistillationConfig(token_loss={}),
        args=args,
    )
    assert not trainer.fused_head
    with_label = DistillationConfig(token_loss={}, label_loss_weight=0.5)  # the label loss reads the logits
    trainer = DistillationTrainer(
        model=tiny_llama_tied(1, seed=0), teacher_model=tiny_llama_tied(2, seed=1), distillation=with_label, args=args
    )
    assert not trainer.fused_head
