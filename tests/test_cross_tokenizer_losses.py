"""Cross-tokenizer losses: ULD and the span-aligned KL against hand-computed cases, known identities and naive
loops with autograd; chunked equals unchunked in value and gradient; bad input fails with a clear message."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import fisherkd.functional as FF
from fisherkd.functional.cross_tokenizer import span_kl_loss, uld_loss


def logits_of(*rows: list[float]) -> Tensor:
    """Logits whose softmax is the given probabilities."""
    return torch.tensor(rows, dtype=torch.float64).log()


def make(n=6, v_s=9, v_t=13, seed=0, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    zs = (scale * torch.randn(n, v_s, generator=g)).to(dtype).requires_grad_()
    zt = (scale * torch.randn(n, v_t, generator=g)).to(dtype)
    return zs, zt


def grad_of(loss: Tensor, x: Tensor) -> Tensor:
    (g,) = torch.autograd.grad(loss, x)
    return g


# ----------------------------------------------------------------------------------------------------------
# Independent statements of the formulas: one row at a time, plain torch ops, autograd


def naive_sorted_l1(p: Tensor, q: Tensor, k: int | None = None) -> Tensor:
    """Σ_i |sort(p)_i − sort(q)_i|, the shorter padded with zeros (after keeping the k largest of each)."""
    p = p.sort(descending=True).values[:k]
    q = q.sort(descending=True).values[:k]
    width = max(p.numel(), q.numel())
    return (F.pad(p, (0, width - p.numel())) - F.pad(q, (0, width - q.numel()))).abs().sum()


def naive_uld(zs, zt, tau=1.0, rows_s=None, rows_t=None, k=None, weight=None):
    rows_s = range(zs.shape[0]) if rows_s is None else rows_s.tolist()
    rows_t = range(zt.shape[0]) if rows_t is None else rows_t.tolist()
    terms = []
    for n, (i, j) in enumerate(zip(rows_s, rows_t)):
        value = naive_sorted_l1(torch.softmax(zs[i] / tau, -1), torch.softmax(zt[j] / tau, -1), k)
        terms.append(value * (1.0 if weight is None else weight[n]))
    return torch.stack(terms).mean()


def naive_span_kl(zs, zt, s_ids, t_ids, tau=1.0, w_m=None, w_u=None):
    """q = (p[ids_1], …, p[ids_K], 1 − Σ_k p[ids_k]) on each side; w_m·KL(q_t‖q_s) + w_u·ULD on the unshared."""
    if w_m is None:
        w_m = len(t_ids) / zt.shape[-1]
        w_u = 1 - w_m
    s_rest = [c for c in range(zs.shape[-1]) if c not in set(s_ids)]
    t_rest = [c for c in range(zt.shape[-1]) if c not in set(t_ids)]
    terms = []
    for i in range(zs.shape[0]):
        p_s, p_t = torch.softmax(zs[i] / tau, -1), torch.softmax(zt[i] / tau, -1)
        q_s = torch.cat([p_s[s_ids], (1 - p_s[s_ids].sum()).reshape(1)])
        q_t = torch.cat([p_t[t_ids], (1 - p_t[t_ids].sum()).reshape(1)])
        kl = sum(a * (a.log() - b.log()) for a, b in zip(q_t, q_s) if a > 0)
        terms.append(w_m * kl + w_u * naive_sorted_l1(p_s[s_rest], p_t[t_rest]))
    return torch.stack(terms).mean()


# ----------------------------------------------------------------------------------------------------------
# ULD


def test_uld_of_two_known_vectors():
    # sorted: (.5, .3, .2) against (.6, .4, 0): |−.1| + |−.1| + .2
    assert uld_loss(logits_of([0.5, 0.3, 0.2]), logits_of([0.6, 0.4])).item() == pytest.approx(0.4)
    # the same with the roles of the longer vector swapped, and the row mean over both rows
    two = uld_loss(logits_of([0.7, 0.3], [0.5, 0.5]), logits_of([0.2, 0.1, 0.7], [0.25, 0.25, 0.5]))
    assert two.item() == pytest.approx(((0.0 + 0.1 + 0.1) + (0.0 + 0.25 + 0.25)) / 2)


def test_uld_is_zero_for_a_permutation_and_for_zero_padding():
    zs, _ = make(v_s=11)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(1))
    assert uld_loss(zs, zs.detach()[:, perm]).item() == pytest.approx(0.0, abs=1e-12)
    # extra teacher tokens with no probability are the zero padding
    padded = torch.cat([zs.detach()[:, perm], torch.full((zs.shape[0], 5), -1e4, dtype=zs.dtype)], -1)
    assert uld_loss(zs, padded).item() == pytest.approx(0.0, abs=1e-12)
    assert uld_loss(zs, padded + 0.5 * torch.randn_like(padded)).item() > 1e-3


@pytest.mark.parametrize("v_s, v_t", [(9, 13), (13, 9), (10, 10)])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_uld_matches_the_naive_loop_in_value_and_gradient(v_s, v_t, tau):
    zs, zt = make(v_s=v_s, v_t=v_t)
    loss = uld_loss(zs, zt, tau)
    ref = naive_uld(zs, zt, tau)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad_of(loss, zs), grad_of(ref, zs))


@pytest.mark.parametrize("k", [1, 4, 11, 50])
def test_uld_top_k_matches_the_naive_loop(k):
    zs, zt = make(v_s=9, v_t=13)
    loss = uld_loss(zs, zt, top_k=k)
    ref = naive_uld(zs, zt, k=k)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad_of(loss, zs), grad_of(ref, zs))


def test_uld_with_rows_of_batched_logits_and_weights():
    g = torch.Generator().manual_seed(3)
    zs = torch.randn(2, 5, 9, dtype=torch.float64, generator=g).requires_grad_()
    zt = torch.randn(2, 7, 13, dtype=torch.float64, generator=g)
    rows_s = torch.tensor([0, 3, 5, 9, 3])  # row 3 twice: its gradient adds up
    rows_t = torch.tensor([1, 2, 7, 13, 8])
    weight = torch.tensor([0.5, 1.5, 1.0, 2.0, 0.0], dtype=torch.float64)
    loss = uld_loss(zs, zt, 1.5, student_rows=rows_s, teacher_rows=rows_t, sample_weight=weight)
    ref = naive_uld(zs.flatten(0, 1), zt.flatten(0, 1), 1.5, rows_s, rows_t, weight=weight)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad_of(loss, zs), grad_of(ref, zs))
    total = uld_loss(zs, zt, 1.5, student_rows=rows_s, teacher_rows=rows_t, sample_weight=weight, reduction="sum")
    torch.testing.assert_close(total, ref * 5)


# ----------------------------------------------------------------------------------------------------------
# Span-aligned KL


def test_span_kl_by_hand():
    # student {a, b, c}: (.5, .3, .2); teacher {a, b, d, e}: (.4, .4, .1, .1); a and b shared.
    # q_s = (.5, .3, .2), q_t = (.4, .4, .2): KL = .4 ln(.4/.5) + .4 ln(.4/.3) + .2 ln 1;
    # unshared: (.2) against (.1, .1): .1 + .1; adaptive weights 2/4 and 2/4.
    kl = 0.4 * math.log(0.4 / 0.5) + 0.4 * math.log(0.4 / 0.3)
    ids = torch.tensor([0, 1])
    loss = span_kl_loss(logits_of([0.5, 0.3, 0.2]), logits_of([0.4, 0.4, 0.1, 0.1]), ids, ids)
    assert loss.item() == pytest.approx(0.5 * kl + 0.5 * 0.2)
    given = span_kl_loss(
        logits_of([0.5, 0.3, 0.2]), logits_of([0.4, 0.4, 0.1, 0.1]), ids, ids, matched_weight=1, unmatched_weight=2
    )
    assert given.item() == pytest.approx(kl + 2 * 0.2)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_span_kl_is_the_ordinary_kl_when_vocabularies_are_identical(tau):
    zs, zt = make(v_s=11, v_t=11)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(2))
    # the same vocabulary listed in another order: student id perm[k] is teacher id k
    loss = span_kl_loss(zs, zt[:, perm], torch.arange(11), torch.argsort(perm), tau)
    ref = FF.kd(zs, zt, tau) / tau**2  # functional.kd is τ²·KL(p_t ‖ p_s), batch mean
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad_of(loss, zs), grad_of(ref, zs))
    # the unmatched term has nothing to compare, whatever its weight
    weights = {"matched_weight": 1.0, "unmatched_weight": 5.0}
    weighted = span_kl_loss(zs, zt[:, perm], torch.arange(11), torch.argsort(perm), tau, **weights)
    torch.testing.assert_close(weighted, ref)


@pytest.mark.parametrize("weights", [(None, None), (0.7, 0.3), (1.0, 0.0), (0.0, 1.0)])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_span_kl_matches_the_naive_loop(weights, tau):
    zs, zt = make(v_s=9, v_t=13, seed=4)
    s_ids, t_ids = [4, 0, 7, 2, 8], [1, 12, 3, 6, 0]
    kw = {"matched_weight": weights[0], "unmatched_weight": weights[1]}
    loss = span_kl_loss(zs, zt, torch.tensor(s_ids), torch.tensor(t_ids), tau, **kw)
    ref = naive_span_kl(zs, zt, s_ids, t_ids, tau, *weights)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad_of(loss, zs), grad_of(ref, zs))


def test_span_kl_when_the_teacher_has_no_unshared_token():
    # the teacher's rest bucket is empty (q_t,rest = 0): KL still finite, the student's rest mass is pushed down
    zs, zt = make(v_s=9, v_t=4, seed=5)
    s_ids, t_ids = [5, 1, 2, 8], [0, 1, 2, 3]
    loss = span_kl_loss(zs, zt, torch.tensor(s_ids), torch.tensor(t_ids))
    ref = naive_span_kl(zs, zt, s_ids, t_ids)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad_of(loss, zs), grad_of(ref, zs))


def test_uld_and_the_unmatched_term_agree_with_trls_gold_loss():
    # TRL's ULDLoss (GOLD) with positional pairing and no tokenizer alignment is the same ULD, mean over the tokens
    # of one sequence; its hybrid loss with matched weight 0 is the unmatched term alone
    gold = pytest.importorskip("trl.experimental.gold.gold_trainer")
    config = SimpleNamespace(
        uld_crossentropy_weight=0.0,
        uld_distillation_weight=1.0,
        uld_student_temperature=1.0,
        uld_teacher_temperature=1.0,
        uld_skip_student_eos=False,
        uld_skip_teacher_eos=False,
        use_extended_uld=False,
        uld_token_merge_strategy="observed",
        uld_use_hybrid_loss=False,
        uld_hybrid_matched_weight=None,
        uld_hybrid_unmatched_weight=None,
        beta=0.5,
    )
    zs, zt = make(n=7, v_s=50, v_t=80, seed=9)
    zs, zt = zs.detach().unsqueeze(0), zt.unsqueeze(0)
    labels = torch.zeros(1, 7, dtype=torch.long)
    trl = gold.ULDLoss(config)(zs.clone(), zt.clone(), labels, labels, labels, labels)
    torch.testing.assert_close(uld_loss(zs, zt), trl)

    config.uld_use_hybrid_loss, config.uld_hybrid_matched_weight, config.uld_hybrid_unmatched_weight = True, 0.0, 1.0
    hybrid = gold.ULDLoss(config)
    t_ids, s_ids = torch.tensor([3, 10, 11, 40, 79]), torch.tensor([0, 7, 49, 20, 5])
    hybrid._vocab_mapping = dict(zip(t_ids.tolist(), s_ids.tolist()))
    hybrid._teacher_matched_ids = set(t_ids.tolist())
    hybrid.mapping_tensor = torch.full((80,), -1, dtype=torch.long)
    hybrid.mapping_tensor[t_ids] = s_ids
    trl = hybrid(zs.clone(), zt.clone(), labels, labels, labels, labels)
    torch.testing.assert_close(span_kl_loss(zs, zt, s_ids, t_ids, matched_weight=0.0, unmatched_weight=1.0), trl)


# ----------------------------------------------------------------------------------------------------------
# Chunks, dtypes, no_grad


LOSSES = {
    "uld": lambda zs, zt, **kw: uld_loss(zs, zt, 2.0, **kw),
    "span_kl": lambda zs, zt, **kw: span_kl_loss(zs, zt, torch.tensor([0, 3, 5]), torch.tensor([7, 1, 2]), 2.0, **kw),
}


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("chunk_size", [1, 2, 5, 1000])
def test_chunked_equals_unchunked(name, chunk_size):
    zs, zt = make(n=11, v_s=9, v_t=13, seed=6)
    rows_s = torch.randint(0, 11, (17,), generator=torch.Generator().manual_seed(0))
    rows_t = torch.randint(0, 11, (17,), generator=torch.Generator().manual_seed(1))
    kw = {"student_rows": rows_s, "teacher_rows": rows_t}
    whole = LOSSES[name](zs, zt, chunk_size=17, **kw)
    chunked = LOSSES[name](zs, zt, chunk_size=chunk_size, **kw)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(grad_of(chunked, zs), grad_of(whole, zs))


@pytest.mark.parametrize("name", LOSSES)
def test_bf16_logits_give_a_bf16_gradient_close_to_fp32(name):
    zs, zt = make(seed=7, dtype=torch.float32)
    ref = LOSSES[name](zs, zt)
    zs16 = zs.detach().bfloat16().requires_grad_()
    loss = LOSSES[name](zs16, zt.bfloat16())
    assert loss.dtype == torch.float32
    grad = grad_of(loss, zs16)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(grad.float(), grad_of(ref, zs), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", LOSSES)
def test_no_gradient_work_under_no_grad(name):
    zs, zt = make(seed=8)
    with torch.no_grad():
        loss = LOSSES[name](zs, zt)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, LOSSES[name](zs, zt).detach())


# ----------------------------------------------------------------------------------------------------------
# Errors


def test_errors_name_the_problem_and_the_fix():
    zs, zt = make(n=4)
    with pytest.raises(ValueError, match="as many rows: 4 against 3; pass student_rows"):
        uld_loss(zs, zt[:3])
    with pytest.raises(ValueError, match="give both student_rows and teacher_rows"):
        uld_loss(zs, zt, student_rows=torch.tensor([0]))
    with pytest.raises(ValueError, match=r"student_rows must index the 4 rows"):
        uld_loss(zs, zt, student_rows=torch.tensor([4]), teacher_rows=torch.tensor([0]))
    with pytest.raises(ValueError, match="student_rows has 2 entries but teacher_rows has 1"):
        uld_loss(zs, zt, student_rows=torch.tensor([0, 1]), teacher_rows=torch.tensor([0]))
    with pytest.raises(ValueError, match="temperature must be positive"):
        uld_loss(zs, zt, 0.0)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        uld_loss(zs, zt, top_k=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive number of rows"):
        uld_loss(zs, zt, chunk_size=0)
    with pytest.raises(ValueError, match="sample_weight has 3 entries for 4 aligned rows"):
        uld_loss(zs, zt, sample_weight=torch.ones(3))
    ids = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="give both matched_weight and unmatched_weight"):
        span_kl_loss(zs, zt, ids, ids, matched_weight=0.5)
    with pytest.raises(ValueError, match=r"teacher_ids must lie in \[0, 13\)"):
        span_kl_loss(zs, zt, ids, torch.tensor([0, 13]))
    with pytest.raises(ValueError, match="student_ids has repeated ids"):
        span_kl_loss(zs, zt, torch.tensor([1, 1]), ids)
    with pytest.raises(ValueError, match="student_ids has 3 entries but teacher_ids has 2"):
        span_kl_loss(zs, zt, torch.tensor([0, 1, 2]), ids)
    with pytest.raises(ValueError, match="every student token is shared but 4 teacher tokens are not"):
        span_kl_loss(zs, zt, torch.arange(9), torch.arange(9))


def test_backward_twice_is_refused():
    zs, zt = make()
    loss = uld_loss(zs, zt)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="computes its gradient once"):
        loss.backward()
