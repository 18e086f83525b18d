"""The sample and class axes redesigned (issue #12, item 3): γ < 0, the temperature of the estimators, the effective
sample size, WSL's student-aware weights, DKD-like non-target class weights, mixup, and the cost of ``normalize``.
Each against an independent statement: hand-computed cases, float64 formulas and a bisection on the scale."""

import math

import pytest
import torch
from pydantic import ValidationError
from torch.utils._python_dispatch import TorchDispatchMode

from fisherkd.config import TrainConfig
from fisherkd.data import ArrayDataset, DataSplits
from fisherkd.distiller import Distiller
from fisherkd.engine import Trainer
from fisherkd.fisher import FisherBatch, FisherSpec, FisherWeighter, mark_mixed_inputs, normalize, weight_stats
from fisherkd.fisher import estimators as E
from fisherkd.models import create_model


def design(r: torch.Tensor, gamma: float, lam: float = 1.0, floor: float = 1e-3) -> torch.Tensor:
    """DESIGN §4 in float64, floor first: r̃ = max(r, floor·mean r); u = r̃^γ; v = (1−λ) + λ·u/mean u."""
    r = r.double()
    u = torch.maximum(r, floor * r.mean()) ** gamma
    return (1 - lam) + lam * u / u.mean()


def clipped(v: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """clip(s·v, lo, hi) with mean 1, s found by 300 bisection steps on log s (float64)."""
    a, b = -300.0, 300.0
    for _ in range(300):
        m = (a + b) / 2
        a, b = (m, b) if (math.exp(m) * v).clamp(lo, hi).mean() < 1 else (a, m)
    return (math.exp((a + b) / 2) * v).clamp(lo, hi)


def softmax_rows(logits: torch.Tensor, tau: float) -> list[list[float]]:
    rows = []
    for z in logits.tolist():
        e = [math.exp(v / tau) for v in z]
        rows.append([v / sum(e) for v in e])
    return rows


# -- normalize: γ < 0, both solvers, fixed cost ---------------------------------------------------------------------
def test_negative_gamma_favours_small_importances_and_the_floor_bounds_them():
    w = normalize(torch.tensor([0.0, 1.0, 1.0, 1.0]), -1.0, 1.0, clip=(1e-6, 1e6))
    # r̃ = [7.5e-4, 1, 1, 1] (floor·mean r first), u = 1/r̃: the dead entry weighs 1/7.5e-4 times the others
    assert w[0] / w[1] == pytest.approx(1 / 7.5e-4, rel=1e-4) and w.mean().item() == pytest.approx(1.0, abs=1e-6)


def test_negative_gamma_does_not_overflow_without_a_floor():
    # u = r^-2 = 1e60 overflows float32 if formed before scaling (the old operator returned nan here)
    w = normalize(torch.tensor([1e-30, 1.0, 1.0]), -2.0, 1.0, floor=0.0, clip=(1e-6, 1e6))
    assert torch.allclose(w.double(), torch.tensor([3 - 2e-6, 1e-6, 1e-6], dtype=torch.float64), rtol=1e-5)


def test_negative_gamma_with_padding_and_no_floor_keeps_the_valid_entries_apart():
    mask = torch.tensor([True, True, True, False])
    w = normalize(torch.tensor([1.0, 2.0, 4.0, 0.0]), -2.0, 1.0, floor=0.0, clip=(1e-6, 1e6), mask=mask)
    # u = r^-2 = (1, 1/4, 1/16) over the valid entries only, over its mean 7/16; the padding entry gets weight 1
    # (the padding's 0^γ = inf, masked by a product with 0, made every weight nan)
    assert torch.allclose(w, torch.tensor([16 / 7, 4 / 7, 1 / 7, 1.0]), atol=1e-5)


@pytest.mark.parametrize("n", [7, 60, 400])  # 400: above the broadcast budget, the sorted solve
def test_random_rows_match_the_bisection_for_both_signs_of_gamma(n):
    g = torch.Generator().manual_seed(n)
    for trial in range(12):
        r = torch.rand(n, generator=g) ** 8 * 50
        if trial % 3 == 0:
            r = r.round()  # ties and exact zeros
        gamma = (float(torch.rand((), generator=g)) * 4 - 2) or 0.5
        lam = 0.2 + 0.8 * float(torch.rand((), generator=g))
        lo, hi = 0.05 + 0.9 * float(torch.rand((), generator=g)), 1.1 + 5 * float(torch.rand((), generator=g))
        w = normalize(r, gamma, lam, clip=(lo, hi)).double()
        v = design(r, gamma, lam) if r.max() > 0 else torch.ones(n, dtype=torch.float64)
        assert w.mean().item() == pytest.approx(1.0, abs=1e-5), trial
        assert torch.allclose(w, clipped(v, lo, hi), atol=1e-4), trial


@pytest.mark.parametrize("n", [30, 300])
def test_masked_rows_match_the_bisection_on_their_valid_entries(n):
    g = torch.Generator().manual_seed(3)
    r = torch.rand(2, n, generator=g) ** 6
    mask = torch.rand(2, n, generator=g) > 0.4
    w = normalize(r, 0.5, 1.0, mask=mask, clip=(0.2, 4.0)).double()
    for row in range(2):
        assert torch.allclose(w[row][mask[row]], clipped(design(r[row][mask[row]], 0.5), 0.2, 4.0), atol=1e-5)
    assert torch.equal(w[~mask], torch.ones(int((~mask).sum()), dtype=torch.float64))


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def test_one_row_of_sample_weights_costs_few_kernels():
    # On a CPU the cost of per-sample weights is the number of small kernels: the sorted solve took 64 dispatches
    # for one row of 100 (γ = 0.5, λ = 1); the broadcast solve with λ = 1 folded into its scale takes under 40.
    with _Count() as count:
        normalize(torch.rand(1, 100), 0.5, 1.0)
    assert count.ops < 40, count.ops


# -- the spec --------------------------------------------------------------------------------------------------------
def test_negative_gamma_and_mixed_are_checked_against_the_axis():
    assert FisherSpec(axis="sample", gamma=-0.5).active
    with pytest.raises(ValidationError, match="gamma < 0 applies to axis sample only"):
        FisherSpec(axis="class", gamma=-1.0)
    with pytest.raises(ValidationError, match="mixed applies to the per-batch axes"):
        FisherSpec(axis="class", mixed="off")
    with pytest.raises(ValidationError, match="takes the estimators logit, linear_head, wsl"):
        FisherSpec(axis="sample", estimator="non_target")
    assert FisherSpec(axis="sample").mixed == "estimate"  # the default keeps today's behaviour


# -- temperature -----------------------------------------------------------------------------------------------------
WIDE = (1e-6, 1e6)  # a clip that never binds: the weights are the importances over their mean


def test_the_temperature_reaches_the_sample_estimator():
    logits = torch.tensor([[4.0, 0.0, -1.0], [1.0, 0.5, 0.0], [3.0, 2.9, -2.0]])
    for tau in (1.0, 4.0):
        weighter = FisherWeighter(FisherSpec(axis="sample", temperature=tau, clip=WIDE), "kd")
        weights, _ = weighter(FisherBatch(torch.zeros(3, 1), torch.nn.Identity(), logits))
        trace = [1 - sum(p * p for p in row) for row in softmax_rows(logits, tau)]
        expected = torch.tensor([t / (sum(trace) / 3) for t in trace])
        assert torch.allclose(weights, expected, atol=1e-5), tau


def test_the_temperature_reaches_the_class_estimator():
    logits = torch.tensor([[4.0, 0.0, -1.0], [1.0, 0.5, 0.0], [3.0, 2.9, -2.0]])
    spec = FisherSpec(axis="class", temperature=3.0, clip=WIDE, every=1, fraction=1.0, ema=0.0)
    weighter = FisherWeighter(spec, "fisher_logit").train()
    weights, _ = weighter(FisherBatch(torch.zeros(3, 1), torch.nn.Identity(), logits))
    rows = softmax_rows(logits, 3.0)
    per_class = [sum(row[c] * (1 - row[c]) for row in rows) / 3 for c in range(3)]
    expected = torch.tensor([f / (sum(per_class) / 3) for f in per_class])
    assert torch.allclose(weights, expected, atol=1e-5)


# -- effective sample size ----------------------------------------------------------------------------------------
def test_effective_sample_size_by_hand():
    assert weight_stats(torch.tensor([0.5, 0.5, 1.0, 2.0]), ess=True)["ess"].item() == pytest.approx(16 / 22)
    assert weight_stats(torch.ones(5), ess=True)["ess"].item() == pytest.approx(1.0)
    assert "ess" not in weight_stats(torch.ones(5))


def test_sample_weights_log_their_effective_sample_size_and_class_weights_do_not():
    logits = torch.randn(16, 5, generator=torch.Generator().manual_seed(0)) * 3
    batch = FisherBatch(torch.zeros(16, 1), torch.nn.Identity(), logits)
    weights, stats = FisherWeighter(FisherSpec(axis="sample"), "kd")(batch)
    w = weights.double()
    assert stats["ess"].item() == pytest.approx((w.sum() ** 2 / (16 * (w**2).sum())).item(), rel=1e-5)
    assert stats["ess"].item() < 1.0
    class_weighter = FisherWeighter(FisherSpec(axis="class", every=1), "fisher_logit").train()
    assert set(class_weighter(batch)[1]) == {"entropy", "max_min"}


# -- WSL ---------------------------------------------------------------------------------------------------------------
def test_wsl_weight_by_hand():
    student = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    teacher = torch.tensor([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    target = torch.tensor([0, 1])
    for tau in (1.0, 2.0):
        ps, pt = softmax_rows(student, tau), softmax_rows(teacher, tau)
        ce = [(-math.log(ps[n][y]), -math.log(pt[n][y])) for n, y in enumerate([0, 1])]
        expected = [1 - math.exp(-cs / (ct + 1e-7)) for cs, ct in ce]
        assert torch.allclose(E.wsl_weight(student, teacher, target, tau), torch.tensor(expected), atol=1e-6)
    # sample 1, where the student already beats a wrong teacher (CE_s ≪ CE_t), gets the smaller weight
    w = E.wsl_weight(student, teacher, target)
    assert w[1] < w[0]


def _pair(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny MLP student and teacher (5 classes) and a batch of 12 with labels."""
    torch.manual_seed(seed)
    student, teacher = create_model("mlp", 1, 5, hidden=(8,)), create_model("mlp", 1, 5, hidden=(16,))
    g = torch.Generator().manual_seed(seed)
    return student, teacher, torch.randn(12, 40, generator=g), torch.randint(0, 5, (12,), generator=g)


def test_wsl_sample_weights_read_the_students_logits_in_the_distiller():
    student, teacher, x, y = _pair()
    kd = {"name": "kd", "weight": 1.0, "fisher": {"axis": "sample", "estimator": "wsl", "clip": list(WIDE)}}
    out = Distiller(student, teacher, [kd])(x, y)
    # independent: WSL's weight from the output logits, over its mean; KD = τ²·mean_n w_n·KL(p_t,n ‖ p_s,n), τ = 4
    s, t = out.logits.detach().double(), out.teacher_logits.double()
    ce_s, ce_t = -s.log_softmax(-1)[torch.arange(12), y], -t.log_softmax(-1)[torch.arange(12), y]
    raw = 1 - torch.exp(-ce_s / (ce_t + 1e-7))
    w = raw / raw.mean()
    log_pt, log_ps = (t / 4).log_softmax(-1), (s / 4).log_softmax(-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    assert out.losses["kd"].item() == pytest.approx(16 * (w * kl).mean().item(), rel=1e-5)
    assert "fisher.kd.sample.ess" in out.stats
    with pytest.raises(ValueError, match="the wsl estimator needs labels"):
        Distiller(student, teacher, [kd])(x)


# -- non-target class weights -------------------------------------------------------------------------------------
P = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.3, 0.5]])
LABELS = torch.tensor([0, 1, -100])  # the last label is ignored


def test_non_target_probabilities_by_hand():
    expected = torch.tensor([[0.0, 2 / 3, 1 / 3], [6 / 7, 0.0, 1 / 7], [0.0, 0.0, 0.0]])
    assert torch.allclose(E.non_target(P.log(), LABELS), expected, atol=1e-6)


def test_non_target_class_weights_by_hand():
    spec = FisherSpec(axis="class", estimator="non_target", clip=WIDE, every=1, fraction=1.0, ema=0.0)
    weighter = FisherWeighter(spec, "fisher_logit").train()
    weights, _ = weighter(FisherBatch(torch.zeros(3, 1), torch.nn.Identity(), P.log(), LABELS))
    # mean over the two labelled rows, (3/7, 1/3, 5/21); each row sums to 1, so the weights are C times it
    assert torch.allclose(weights, 3 * torch.tensor([3 / 7, 1 / 3, 5 / 21]), atol=1e-5)


def test_non_target_class_weights_train_through_the_distiller():
    student, teacher, x, y = _pair(1)
    spec = {"name": "fisher_logit", "fisher": {"axis": "class", "estimator": "non_target", "every": 1}}
    distiller = Distiller(student, teacher, [spec])
    out = distiller(x, y)
    assert torch.isfinite(out.loss) and distiller.fisher["fisher_logit"].last_weights.shape == (5,)


# -- mixup -------------------------------------------------------------------------------------------------------------
def test_mixed_off_leaves_sample_weights_out_once_the_batches_are_mixed():
    student, teacher, x, y = _pair(2)
    plain = Distiller(student, teacher, [{"name": "kd"}])(x, y).losses["kd"]
    for mode, weighted in (("off", False), ("estimate", True)):
        distiller = Distiller(student, teacher, [{"name": "kd", "fisher": {"axis": "sample", "mixed": mode}}])
        assert "fisher.kd.sample.ess" in distiller(x, y).stats  # not mixed: weighted either way
        mark_mixed_inputs(distiller)
        out = distiller(x, y)
        assert ("fisher.kd.sample.ess" in out.stats) == weighted
        assert torch.equal(out.losses["kd"], plain) != weighted


def test_the_engine_marks_its_distiller_when_it_mixes_batches():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 40, generator=g), torch.randint(0, 4, (48,), generator=g)
    splits = DataSplits("toy", ArrayDataset(x[:32], y[:32]), ArrayDataset(x[32:], y[32:]), 4, (40,))
    for alpha in (0.0, 1.0):
        student, teacher, _, _ = _pair()
        distiller = Distiller(student, teacher, [{"name": "kd", "fisher": {"axis": "sample", "mixed": "off"}}])
        Trainer(distiller, splits, TrainConfig(batch_size=16, augment={"mixup_alpha": alpha}), device="cpu")
        assert distiller.fisher["kd"].mixed_inputs == (alpha > 0)


def test_wsl_scores_a_row_without_a_label_against_the_teachers_top_class():
    student, teacher = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[0.0, 0.5, 3.0]])
    unlabelled = E.wsl_weight(student, teacher, torch.tensor([-100]))
    as_top_class = E.wsl_weight(student, teacher, torch.tensor([2]))  # the teacher's argmax
    torch.testing.assert_close(unlabelled, as_top_class)
