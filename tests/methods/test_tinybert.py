import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fisherkd import functional as Fn
from fisherkd.distiller import Distiller


def random_mask(batch: int, length: int, seed: int = 0) -> Tensor:
    """B×T padding mask with lengths in [1, T] and at least one full row."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    lengths[0] = length
    return (torch.arange(length)[None, :] < lengths[:, None]).long()


def naive_hidden(s: Tensor, t: Tensor, mask: Tensor | None = None, token_weight: Tensor | None = None) -> float:
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if mask is not None and not mask[b, i]:
                continue
            w = 1.0 if token_weight is None else token_weight[b, i].item()
            total += w * sum((s[b, i, d].item() - t[b, i, d].item()) ** 2 for d in range(s.shape[2]))
            count += s.shape[2]
    return total / count


def naive_attention(
    s: Tensor,
    t: Tensor,
    mask: Tensor | None = None,
    head_weight: Tensor | None = None,
    token_weight: Tensor | None = None,
) -> float:
    batch, heads, length, _ = s.shape
    valid = [[mask is None or bool(mask[b, i]) for i in range(length)] for b in range(batch)]
    total, count = 0.0, 0
    for b in range(batch):
        for h in range(heads):
            for q in range(length):
                for k in range(length):
                    if not (valid[b][q] and valid[b][k]):
                        continue
                    a, c = s[b, h, q, k].item(), t[b, h, q, k].item()
                    a, c = (0.0 if a <= -100 else a), (0.0 if c <= -100 else c)
                    w = 1.0 if head_weight is None else head_weight[h].item()
                    w *= 1.0 if token_weight is None else token_weight[b, q].item()
                    total += w * (a - c) ** 2
                    count += 1
    return total / count


def test_tinybert_hidden_matches_naive_loop_and_mse():
    for shape in [(1, 1, 1), (2, 5, 3), (3, 4, 7)]:
        s, t = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
        mask = random_mask(shape[0], shape[1], seed=shape[2])
        weight = torch.rand(shape[:2], dtype=torch.float64) + 0.5
        assert math.isclose(Fn.tinybert_hidden(s, t).item(), F.mse_loss(s, t).item(), rel_tol=1e-12)
        assert math.isclose(Fn.tinybert_hidden(s, t).item(), naive_hidden(s, t), rel_tol=1e-9)
        value = Fn.tinybert_hidden(s, t, mask, token_weight=weight).item()
        assert math.isclose(value, naive_hidden(s, t, mask, weight), rel_tol=1e-9)


def test_tinybert_attention_matches_naive_loop():
    for shape in [(1, 1, 3, 3), (2, 3, 5, 5), (3, 2, 4, 4)]:
        s, t = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
        mask = random_mask(shape[0], shape[2], seed=shape[1])
        head = torch.rand(shape[1], dtype=torch.float64) + 0.5
        token = torch.rand(shape[0], shape[2], dtype=torch.float64) + 0.5
        assert math.isclose(Fn.tinybert_attention(s, t).item(), F.mse_loss(s, t).item(), rel_tol=1e-12)
        assert math.isclose(Fn.tinybert_attention(s, t, mask).item(), naive_attention(s, t, mask), rel_tol=1e-9)
        value = Fn.tinybert_attention(s, t, mask, head_weight=head, token_weight=token).item()
        assert math.isclose(value, naive_attention(s, t, mask, head, token), rel_tol=1e-9)


def test_tinybert_attention_zeroes_masked_scores_like_the_authors():
    # Pre-softmax scores with the additive padding mask (−10000 or −inf) on the padded keys.
    s, t = torch.randn(2, 2, 4, 4, dtype=torch.float64), torch.randn(2, 2, 4, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    keys = (mask == 0)[:, None, None, :]
    s_scores, t_scores = s.masked_fill(keys, -10000.0), t.masked_fill(keys, float("-inf"))
    zeroed = F.mse_loss(s.masked_fill(keys, 0.0), t.masked_fill(keys, 0.0))
    assert torch.allclose(Fn.tinybert_attention(s_scores, t_scores), zeroed)
    assert math.isclose(Fn.tinybert_attention(s_scores, t_scores).item(), naive_attention(s_scores, t_scores))


def test_tinybert_padded_positions_change_nothing():
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    pad = mask == 0
    s, t = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    noisy_s = torch.where(pad[..., None], torch.randn(2, 5, 6) * 100, s)
    assert torch.equal(Fn.tinybert_hidden(s, t, mask), Fn.tinybert_hidden(noisy_s, t, mask))
    a, b = torch.rand(2, 3, 5, 5), torch.rand(2, 3, 5, 5)
    padded = pad[:, None, :, None] | pad[:, None, None, :]  # padded queries and padded keys
    noisy_a = torch.where(padded, torch.randn(2, 3, 5, 5) * 100, a)
    assert torch.equal(Fn.tinybert_attention(a, b, mask), Fn.tinybert_attention(noisy_a, b, mask))


def test_tinybert_all_ones_weights_reproduce_unweighted_exactly():
    mask = random_mask(3, 6)
    s, t = torch.randn(3, 6, 4), torch.randn(3, 6, 4)
    ones_t = torch.ones(3, 6)
    assert torch.equal(Fn.tinybert_hidden(s, t, mask, token_weight=ones_t), Fn.tinybert_hidden(s, t, mask))
    a, b = torch.rand(3, 2, 6, 6), torch.rand(3, 2, 6, 6)
    weighted = Fn.tinybert_attention(a, b, mask, head_weight=torch.ones(2), token_weight=ones_t)
    assert torch.equal(weighted, Fn.tinybert_attention(a, b, mask))


def test_tinybert_gradcheck():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    s = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: Fn.tinybert_hidden(x, t, mask), (s,))
    a = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: Fn.tinybert_attention(x, b, mask), (a,))


def test_tinybert_bfloat16_is_finite_and_close():
    mask = random_mask(4, 8)
    s, t = torch.randn(4, 8, 16), torch.randn(4, 8, 16)
    a, b = torch.randn(4, 2, 8, 8).softmax(-1), torch.randn(4, 2, 8, 8).softmax(-1)
    for fn, x, y in ((Fn.tinybert_hidden, s, t), (Fn.tinybert_attention, a, b)):
        low, high = fn(x.bfloat16(), y.bfloat16(), mask), fn(x, y, mask)
        assert low.dtype == torch.float32 and torch.isfinite(low)
        assert abs(low.item() - high.item()) < 0.05 * high.item() + 1e-4


def test_tinybert_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"\(2, 2, 5, 5\).*\(2, 4, 5, 5\).*minilm"):
        Fn.tinybert_attention(torch.rand(2, 2, 5, 5), torch.rand(2, 4, 5, 5))
    with pytest.raises(ValueError, match="width"):
        Fn.tinybert_hidden(torch.rand(2, 5, 8), torch.rand(2, 5, 16))
    with pytest.raises(ValueError, match="head_weight"):
        Fn.tinybert_attention(torch.rand(2, 2, 5, 5), torch.rand(2, 2, 5, 5), head_weight=torch.ones(3))


# --- end to end with tiny Transformers BERTs (shared with test_minilm) ---


def tiny_bert(hidden: int, heads: int, seed: int = 0, attention_dropout: float = 0.0) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=attention_dropout,  # the tapped probabilities are taken after dropout
        attn_implementation="eager",  # "sdpa" (the default) never forms the attention map: the tap gets None
    )
    return transformers.BertForSequenceClassification(config)


def text_batch(batch: int = 8, length: int = 10) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = random_mask(batch, length)
    ids = torch.randint(1, 50, (batch, length), generator=g) * mask
    return {"input_ids": ids, "attention_mask": mask}


def distill_text(specs: list[dict], student: nn.Module, teacher: nn.Module, steps: int = 8) -> list[dict]:
    """A few Adam steps on one padded batch; asserts finite, decreasing total loss; returns per-step terms."""
    batch = text_batch()
    distiller = Distiller(student, teacher, specs, example_input={k: v[:2] for k, v in batch.items()})
    optimizer = torch.optim.Adam(distiller.trainable_parameters(), lr=1e-2)
    history = []
    for _ in range(steps):
        out = distiller(batch)  # the distiller takes the padding mask from batch["attention_mask"]
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        history.append({"loss": out.loss.item(), **{k: v.item() for k, v in out.losses.items()}})
    distiller.close()
    losses = [h["loss"] for h in history]
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0], f"loss did not decrease: {losses[0]:.4g} -> {losses[-1]:.4g}"
    return history


def test_tinybert_distills_tiny_berts_end_to_end():
    hidden = [("bert.embeddings", "bert.embeddings")] + [(f"bert.encoder.layer.{i}",) * 2 for i in range(2)]
    attention = [(f"bert.encoder.layer.{i}.attention.self:1",) * 2 for i in range(2)]
    student, teacher = tiny_bert(16, 2, seed=1), tiny_bert(32, 2, seed=2)
    batch = text_batch()
    distiller = Distiller(student, teacher, [{"name": "tinybert", "pairs": hidden + attention}], batch)
    # hidden pairs get a 16 -> 32 projection; attention maps are compared as they are
    assert sorted(distiller.adapters) == ["m0_p0", "m0_p1", "m0_p2"]
    assert all(a.in_features == 16 and a.out_features == 32 for a in distiller.adapters.values())
    distiller.close()
    history = distill_text([{"name": "tinybert", "pairs": hidden + attention}], student, teacher)
    assert {"tinybert_hidden", "tinybert_attention"} <= history[0].keys()
    # The hidden MSE dominates the sum at initialization; alone, the attention MSE must go down too.
    distill_text([{"name": "tinybert", "pairs": attention}], tiny_bert(16, 2, seed=1), tiny_bert(32, 2, seed=2))
