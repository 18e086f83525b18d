"""Offline top-k teacher: the cache round-trips safely, the sparse loss equals the online loss at k = V and the
(k+1)-bucket divergence (with autograd through the plain formulas) at k < V."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import fisherkd.functional as F
import fisherkd.hf.topk_cache as topk_cache
from fisherkd.hf import (
    DIVERGENCES,
    CachedTeacher,
    cache_teacher_topk,
    token_distillation_loss,
    topk_distillation_loss,
)
from fisherkd.hf.topk_cache import teacher_topk


def make(b=3, t=8, v=11, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    zs = (3 * torch.randn(b, t, v, generator=g)).to(dtype).requires_grad_()
    zt = (3 * torch.randn(b, t, v, generator=g)).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :3] = -100
    labels[2, -2:] = -100
    return zs, zt, labels


def value_and_grad(loss: Tensor, zs: Tensor) -> tuple[Tensor, Tensor]:
    (grad,) = torch.autograd.grad(loss, zs)
    return loss.detach(), grad


def bucket_divergence(log_q_s: Tensor, log_q_t: Tensor, divergence: str, tau: float, weight: Tensor) -> Tensor:
    """The functional losses on (k+1)-bucket log-probabilities (log-softmax at τ = 1 leaves them as they are)."""
    w = {"sample_weight": weight}
    loss = {
        "forward_kl": lambda: F.kd(log_q_s, log_q_t, temperature=1.0, **w) * tau**2,
        "reverse_kl": lambda: F.reverse_kl(log_q_s, log_q_t, **w) * tau**2,
        "jsd": lambda: F.jsd(log_q_s, log_q_t, beta=0.5, **w),
        "tvd": lambda: F.tvd(log_q_s, log_q_t, **w),
        "skew_kl": lambda: F.skew_kl(log_q_s, log_q_t, alpha=0.1, **w),
        "skew_reverse_kl": lambda: F.skew_reverse_kl(log_q_s, log_q_t, alpha=0.1, **w),
    }
    return loss[divergence]()


def test_teacher_topk_keeps_all_mass():
    _, zt, _ = make()
    idx, top, tail = teacher_topk(zt, k=4, temperature=2.0, chunk_size=5)
    full = torch.log_softmax(zt / 2.0, dim=-1)
    torch.testing.assert_close(top, full.gather(-1, idx))
    torch.testing.assert_close(torch.cat([top, tail.unsqueeze(-1)], -1).logsumexp(-1), torch.zeros(tail.shape).double())
    assert (top[..., :-1] >= top[..., 1:]).all()  # most probable first
    _, _, empty_tail = teacher_topk(zt, k=zt.shape[-1])
    assert torch.isneginf(empty_tail).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_full_k_equals_online_loss(divergence):
    zs, zt, labels = make()
    idx, top, tail = teacher_topk(zt, k=zt.shape[-1], temperature=2.0)
    sparse = value_and_grad(topk_distillation_loss(zs, idx, top, tail, labels, divergence, 2.0, chunk_size=4), zs)
    online = value_and_grad(token_distillation_loss(zs, zt, labels, divergence, 2.0), zs)
    torch.testing.assert_close(sparse[0], online[0])
    torch.testing.assert_close(sparse[1], online[1])


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_small_k_is_the_bucket_divergence(divergence):
    zs, zt, labels = make(seed=1)
    tau, k = 1.5, 3
    idx, top, tail = teacher_topk(zt, k=k, temperature=tau)
    weight = torch.rand(labels.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
    loss = topk_distillation_loss(zs, idx, top, tail, labels, divergence, tau, chunk_size=5, token_weight=weight)
    sparse = value_and_grad(loss, zs)

    # naive: materialise the student's softmax, bucket it with plain formulas, autograd through it all
    valid = torch.zeros_like(labels, dtype=torch.bool)
    valid[:, :-1] = labels[:, 1:] != -100
    p_s = torch.softmax(zs / tau, dim=-1)[valid]
    q_s_top = p_s.gather(-1, idx[valid])
    log_q_s = torch.cat([q_s_top, 1 - q_s_top.sum(-1, keepdim=True)], -1).log()
    log_q_t = torch.cat([top[valid], tail[valid].unsqueeze(-1)], -1)
    naive = bucket_divergence(log_q_s, log_q_t, divergence, tau, weight[valid])  # Σ w·ℓ / n, as the loss
    reference = value_and_grad(naive, zs)
    torch.testing.assert_close(sparse[0], reference[0])
    torch.testing.assert_close(sparse[1], reference[1])


def test_sparse_loss_in_bf16_and_checks():
    zs, zt, labels = make(seed=3)
    idx, top, tail = teacher_topk(zt, k=5)
    zs16 = zs.detach().bfloat16().requires_grad_()
    loss = topk_distillation_loss(zs16, idx.to(torch.int32), top.float(), tail.float(), labels, "reverse_kl")
    loss.backward()
    assert loss.dtype == torch.float32 and zs16.grad.dtype == torch.bfloat16 and torch.isfinite(zs16.grad).all()
    with pytest.raises(ValueError, match="student vocabulary size is 11"):
        topk_distillation_loss(zs, idx + 10, top, tail, labels)
    with pytest.raises(ValueError, match="tail"):
        topk_distillation_loss(zs, idx, top, tail[:, 1:], labels)


class TinyLM(nn.Module):
    """A bigram language model, called like a Hugging Face model (input_ids, attention_mask → logits)."""

    def __init__(self, vocab: int = 17, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.head(self.embed(input_ids))


def lm_batches(n: int = 3, vocab: int = 17, seed: int = 0) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, 6), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 4:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


@pytest.mark.parametrize("use_safetensors", [True, False])
def test_cache_round_trip(tmp_path, monkeypatch, use_safetensors):
    if not use_safetensors:
        monkeypatch.setattr(topk_cache, "_safetensors", None)
    elif topk_cache._safetensors is None:
        pytest.skip("safetensors is not installed")
    teacher = TinyLM().train()
    batches = lm_batches()
    cache = cache_teacher_topk(teacher, batches, tmp_path / "cache", k=4, temperature=2.0)
    assert teacher.training  # the mode is restored
    suffix = ".safetensors" if use_safetensors else ".pt"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        *(f"batch_{i:06d}{suffix}" for i in range(3)),
        "meta.json",
    ]
    again = CachedTeacher(tmp_path / "cache")
    assert (len(again), again.k, again.temperature, again.vocab_size) == (3, 4, 2.0, 17)
    teacher.eval()
    for i, (cached, batch) in enumerate(zip(again, batches)):
        with torch.no_grad():
            idx, top, tail = teacher_topk(teacher(batch["input_ids"]), 4, 2.0)
        assert cached.indices.dtype == torch.int32
        torch.testing.assert_close(cached.indices.long(), idx)
        torch.testing.assert_close(cached.logprobs, top)
        torch.testing.assert_close(cached.tail_logprob, tail)
        assert torch.equal(cache.batch(i, input_ids=batch["input_ids"]).input_ids, batch["input_ids"])
    with pytest.raises(ValueError, match="order"):
        cache.batch(0, input_ids=batches[1]["input_ids"])
    with pytest.raises(FileExistsError, match="overwrite"):
        cache_teacher_topk(teacher, batches, tmp_path / "cache", k=4)
    cache_teacher_topk(teacher, batches[:1], tmp_path / "cache", k=2, overwrite=True)
    assert len(CachedTeacher(tmp_path / "cache")) == 1 and len(list((tmp_path / "cache").iterdir())) == 2
    with pytest.raises(FileNotFoundError, match="meta.json"):
        CachedTeacher(tmp_path)


def test_cache_files_hold_only_tensors(tmp_path, monkeypatch):
    monkeypatch.setattr(topk_cache, "_safetensors", None)
    cache_teacher_topk(TinyLM(), lm_batches(1), tmp_path, k=3)
    data = torch.load(tmp_path / "batch_000000.pt", weights_only=True)  # refuses anything but tensors and containers
    assert set(data) == {"indices", "logprobs", "tail_logprob", "input_ids"}
    assert all(isinstance(t, Tensor) for t in data.values())


def test_tiny_gpt2_trains_from_the_cache(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    vocab = 97
    teacher = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_layer=2, n_embd=32, n_head=2)
    )
    student = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_layer=1, n_embd=16, n_head=2)
    )
    batches = lm_batches(2, vocab)
    for batch in batches:
        batch["labels"][:, :2] = -100  # prompt
    cache = cache_teacher_topk(teacher, batches, tmp_path, k=8, temperature=1.0)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        total = 0.0
        for i, batch in enumerate(batches):
            cached = cache.batch(i, input_ids=batch["input_ids"])
            logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = cache.loss(logits, cached, batch["labels"], divergence="forward_kl")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        losses.append(total)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0], losses
