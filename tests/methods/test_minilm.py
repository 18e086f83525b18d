import math

import pytest
import torch
from test_tinybert import distill_text, random_mask, text_batch, tiny_bert
from torch import Tensor

from fisherkd import functional as Fn
from fisherkd.methods import MethodInputs, create


def naive_kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def naive_softmax(scores: list[float]) -> list[float]:
    top = max(scores)
    exps = [math.exp(v - top) for v in scores]
    return [e / sum(exps) for e in exps]


def naive_attention_kl(s: Tensor, t: Tensor, mask=None, head_weight=None, token_weight=None) -> float:
    batch, heads, length, _ = s.shape
    total, count = 0.0, 0
    for b in range(batch):
        keys = [k for k in range(length) if mask is None or mask[b, k]]
        for h in range(heads):
            for q in range(length):
                if mask is not None and not mask[b, q]:
                    continue
                ps = [s[b, h, q, k].item() for k in keys]
                pt = [t[b, h, q, k].item() for k in keys]
                ps, pt = [v / sum(ps) for v in ps], [v / sum(pt) for v in pt]  # padded keys get zero probability
                w = 1.0 if head_weight is None else head_weight[h].item()
                w *= 1.0 if token_weight is None else token_weight[b, q].item()
                total += w * naive_kl(pt, ps)
                count += 1
    return total / count


def naive_relation_kl(s: Tensor, t: Tensor, heads: int, mask=None, head_weight=None, token_weight=None) -> float:
    batch, length = s.shape[:2]

    def relation(x: Tensor, b: int, r: int, q: int, keys: list[int]) -> list[float]:
        size = x.shape[-1] // heads
        part = x[b, :, r * size : (r + 1) * size].tolist()
        return naive_softmax([sum(a * c for a, c in zip(part[q], part[k])) / math.sqrt(size) for k in keys])

    total, count = 0.0, 0
    for b in range(batch):
        keys = [k for k in range(length) if mask is None or mask[b, k]]
        for r in range(heads):
            for q in keys:
                w = 1.0 if head_weight is None else head_weight[r].item()
                w *= 1.0 if token_weight is None else token_weight[b, q].item()
                total += w * naive_kl(relation(t, b, r, q, keys), relation(s, b, r, q, keys))
                count += 1
    return total / count


def probabilities(*shape: int) -> Tensor:
    return (torch.randn(*shape, dtype=torch.float64) * 2).softmax(-1)


def test_minilm_attention_kl_matches_naive_loop():
    for shape in [(1, 1, 3, 3), (2, 3, 5, 5), (3, 2, 4, 4)]:
        s, t = probabilities(*shape), probabilities(*shape)
        mask = random_mask(shape[0], shape[2], seed=shape[1])
        head = torch.rand(shape[1], dtype=torch.float64) + 0.5
        token = torch.rand(shape[0], shape[2], dtype=torch.float64) + 0.5
        assert math.isclose(Fn.minilm_attention_kl(s, t).item(), naive_attention_kl(s, t), rel_tol=1e-9)
        assert math.isclose(Fn.minilm_attention_kl(s, t, mask).item(), naive_attention_kl(s, t, mask), rel_tol=1e-9)
        value = Fn.minilm_attention_kl(s, t, mask, head_weight=head, token_weight=token).item()
        assert math.isclose(value, naive_attention_kl(s, t, mask, head, token), rel_tol=1e-9)


def test_minilm_relation_kl_matches_naive_loop_with_different_widths():
    # Student width 8 and teacher width 12 (e.g. 2 and 3 model heads of size 4) share R = 2 relation heads.
    for (batch, length), heads in [((1, 3), 1), ((2, 5), 2), ((3, 4), 4)]:
        s = torch.randn(batch, length, 8, dtype=torch.float64)
        t = torch.randn(batch, length, 12, dtype=torch.float64)
        mask = random_mask(batch, length, seed=heads)
        head = torch.rand(heads, dtype=torch.float64) + 0.5
        token = torch.rand(batch, length, dtype=torch.float64) + 0.5
        assert math.isclose(Fn.minilm_relation_kl(s, t, heads).item(), naive_relation_kl(s, t, heads), rel_tol=1e-9)
        value = Fn.minilm_relation_kl(s, t, heads, mask).item()
        assert math.isclose(value, naive_relation_kl(s, t, heads, mask), rel_tol=1e-9)
        value = Fn.minilm_relation_kl(s, t, heads, mask, head_weight=head, token_weight=token).item()
        assert math.isclose(value, naive_relation_kl(s, t, heads, mask, head, token), rel_tol=1e-9)


def test_minilm_kl_is_zero_for_identical_inputs():
    mask = random_mask(3, 6)
    a, v = probabilities(3, 2, 6, 6), torch.randn(3, 6, 8, dtype=torch.float64)
    assert abs(Fn.minilm_attention_kl(a, a.clone(), mask).item()) < 1e-12
    assert abs(Fn.minilm_relation_kl(v, v.clone(), 4, mask).item()) < 1e-12
    # Only relations matter, not widths: repeating each relation head's features twice and scaling them by
    # 2^(-1/4) keeps every A Aᵀ/√d_r, so a twice-as-wide teacher has the very same relations.
    wide = torch.cat([v.view(3, 6, 4, 2)] * 2, dim=-1).view(3, 6, 16) * 2**-0.25
    assert abs(Fn.minilm_relation_kl(v, wide, 4, mask).item()) < 1e-12


def test_minilm_padded_positions_change_nothing():
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    pad = mask == 0
    a, b = probabilities(2, 3, 5, 5), probabilities(2, 3, 5, 5)
    padded = pad[:, None, :, None] | pad[:, None, None, :]  # padded queries and padded keys
    noisy_a = torch.where(padded, torch.rand(2, 3, 5, 5, dtype=torch.float64), a)
    assert torch.allclose(Fn.minilm_attention_kl(a, b, mask), Fn.minilm_attention_kl(noisy_a, b, mask), rtol=1e-12)
    s, t = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 12, dtype=torch.float64)
    noisy_s = torch.where(pad[..., None], torch.randn(2, 5, 8, dtype=torch.float64) * 100, s)
    assert torch.equal(Fn.minilm_relation_kl(s, t, 2, mask), Fn.minilm_relation_kl(noisy_s, t, 2, mask))


def test_minilm_all_ones_weights_reproduce_unweighted_exactly():
    mask = random_mask(3, 6)
    ones_t = torch.ones(3, 6, dtype=torch.float64)
    a, b = probabilities(3, 2, 6, 6), probabilities(3, 2, 6, 6)
    weighted = Fn.minilm_attention_kl(a, b, mask, head_weight=torch.ones(2), token_weight=ones_t)
    assert torch.equal(weighted, Fn.minilm_attention_kl(a, b, mask))
    s, t = torch.randn(3, 6, 8, dtype=torch.float64), torch.randn(3, 6, 12, dtype=torch.float64)
    weighted = Fn.minilm_relation_kl(s, t, 2, mask, head_weight=torch.ones(2), token_weight=ones_t)
    assert torch.equal(weighted, Fn.minilm_relation_kl(s, t, 2, mask))


def test_minilm_gradcheck():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    a, b = probabilities(2, 2, 3, 3).requires_grad_(), probabilities(2, 2, 3, 3)
    assert torch.autograd.gradcheck(lambda x: Fn.minilm_attention_kl(x, b, mask), (a,))
    s = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: Fn.minilm_relation_kl(x, t, 2, mask), (s,))


def test_minilm_bfloat16_is_finite_and_close():
    mask = random_mask(4, 8)
    a, b = probabilities(4, 2, 8, 8).float(), probabilities(4, 2, 8, 8).float()
    s, t = torch.randn(4, 8, 16), torch.randn(4, 8, 32)
    for fn, x, y in ((Fn.minilm_attention_kl, a, b), (lambda x, y, m: Fn.minilm_relation_kl(x, y, 4, m), s, t)):
        low, high = fn(x.bfloat16(), y.bfloat16(), mask), fn(x, y, mask)
        assert low.dtype == torch.float32 and torch.isfinite(low)
        assert abs(low.item() - high.item()) < 0.05 * high.item() + 1e-3


def test_minilm_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"\(2, 2, 5, 5\).*\(2, 4, 5, 5\).*relation"):
        Fn.minilm_attention_kl(torch.rand(2, 2, 5, 5), torch.rand(2, 4, 5, 5))
    with pytest.raises(ValueError, match="student width 8 is not divisible by num_relation_heads=3"):
        Fn.minilm_relation_kl(torch.rand(2, 5, 8), torch.rand(2, 5, 12), 3)


def test_minilm_method_routes_pairs_by_rank():
    method = create("minilm", num_relation_heads=2)
    a, b = probabilities(2, 2, 5, 5), probabilities(2, 2, 5, 5)
    s, t = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 12, dtype=torch.float64)
    inputs = MethodInputs(torch.zeros(2, 3), student_features=[a, s, s], teacher_features=[b, t, t])
    terms = method(inputs)
    assert torch.allclose(terms["minilm_attention"], Fn.minilm_attention_kl(a, b))
    assert torch.allclose(terms["minilm_relation"], 2 * Fn.minilm_relation_kl(s, t, 2))  # summed over pairs
    with pytest.raises(ValueError, match="do not sum to 1"):  # pre-softmax scores, or attention dropout
        create("minilm")(MethodInputs(torch.zeros(2, 3), student_features=[a.log()], teacher_features=[b]))


# --- end to end with tiny Transformers BERTs ---


def test_minilm_v1_distills_attention_and_value_relation():
    # MiniLM v1: last layer attention distributions + value relation, equal head counts (2), widths 16 and 32.
    last = "bert.encoder.layer.1.attention.self"
    pairs = [(f"{last}:1", f"{last}:1"), (f"{last}.value", f"{last}.value")]
    spec = {"name": "minilm", "num_relation_heads": 2, "pairs": pairs}
    history = distill_text([spec], tiny_bert(16, 2, seed=1), tiny_bert(32, 2, seed=2))
    assert {"minilm_attention", "minilm_relation"} <= history[0].keys()


def test_minilm_v2_relation_heads_allow_different_head_counts():
    # MiniLMv2: Q-Q, K-K and V-V relations with 4 relation heads; student 2 heads, teacher 4 heads.
    last = "bert.encoder.layer.1.attention.self"
    pairs = [(f"{last}.{x}", f"{last}.{x}") for x in ("query", "key", "value")]
    history = distill_text(
        [{"name": "minilm", "num_relation_heads": 4, "pairs": pairs}],
        tiny_bert(16, 2, seed=1),
        tiny_bert(32, 4, seed=2),
    )
    assert history[-1]["minilm_relation"] < history[0]["minilm_relation"]


def test_minilm_rejects_attention_dropout_in_training():
    from fisherkd.distiller import Distiller

    last = "bert.encoder.layer.1.attention.self:1"
    student, teacher = tiny_bert(16, 2, seed=1, attention_dropout=0.5), tiny_bert(32, 2, seed=2)
    batch = text_batch()
    distiller = Distiller(student, teacher, [{"name": "minilm", "pairs": [(last, last)]}]).train()
    with pytest.raises(ValueError, match="attention_probs_dropout_prob=0.0"):
        distiller(batch, mask=batch["attention_mask"])
    distiller.close()
