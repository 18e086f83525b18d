"""KD-AIF influence sample weights (``fisher: {axis: sample, estimator: influence}``).

Reference: a per-sample loop on tiny linear heads z = Wh + b in float64, with autograd: each sample's gradient of
its cross-entropy w.r.t. the student head's bias, the teacher's Fisher of its own bias as E_{ŷ∼p_t}[∇ log p ∇ log pᵀ]
enumerated over the classes, the damped solve, the leave-one-out reference and the sigmoid. Nothing there uses the
closed forms softmax − one-hot or diag p − ppᵀ that the estimator uses.
"""

import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from fisherkd.distiller import Distiller
from fisherkd.fisher import FisherBatch, FisherSpec, FisherWeighter, normalize
from fisherkd.fisher import estimators as E
from fisherkd.models import create_model

WIDE = (1e-6, 1e6)


def heads(seed: int = 0, n: int = 7, d: int = 5, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    h_s, h_t = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    student, teacher = nn.Linear(d, classes).double(), nn.Linear(d, classes).double()
    for m in (student, teacher):
        nn.init.normal_(m.weight, generator=g)
        nn.init.normal_(m.bias, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return student, teacher, h_s, h_t, y


def naive_influence(student, teacher, h_s, h_t, y, tau: float = 1.0, damping: float = 0.01) -> list[float]:
    n, classes = len(y), teacher.out_features
    grads = []
    for i in range(n):  # ∂ CE(z_i, y_i) / ∂b of the student head, one sample at a time
        loss = nn.functional.cross_entropy(student(h_s[i : i + 1]), y[i : i + 1])
        grads.append(torch.autograd.grad(loss, student.bias)[0])
    fisher = torch.zeros(classes, classes, dtype=torch.float64)
    for i in range(n):  # the teacher's Fisher of its bias: Σ_c p_c s_c s_cᵀ, s_c = ∇_b log p(c | x_i) at τ
        log_p = (teacher(h_t[i]) / tau).log_softmax(-1)
        for c in range(classes):
            (score,) = torch.autograd.grad(log_p[c], teacher.bias, retain_graph=True)
            fisher += log_p[c].exp().detach() * torch.outer(score, score) * tau**2 / n  # τ² undoes ∂(z/τ) = 1/τ
    fisher += damping * torch.trace(fisher) / classes * torch.eye(classes, dtype=torch.float64)
    inverse = torch.linalg.inv(fisher)
    h = []
    for i in range(n):
        rest = sum(grads[m] for m in range(n) if m != i) / (n - 1)
        h.append(float(grads[i] @ inverse @ rest))
    rms = math.sqrt(sum(v * v for v in h) / n)
    return [1 / (1 + math.exp(-v / rms)) for v in h]


@pytest.mark.parametrize(("seed", "tau", "damping"), [(0, 1.0, 0.01), (1, 2.0, 0.01), (2, 1.0, 0.5)])
def test_influence_weight_matches_a_per_sample_loop_on_linear_heads(seed, tau, damping):
    student, teacher, h_s, h_t, y = heads(seed)
    expected = naive_influence(student, teacher, h_s, h_t, y, tau, damping)
    with torch.no_grad():
        raw = E.influence_weight(student(h_s), teacher(h_t), y, tau, damping)
    assert torch.allclose(raw.double(), torch.tensor(expected, dtype=torch.float64), atol=2e-5)


def test_the_weighter_normalizes_the_sigmoid_to_mean_one():
    student, teacher, h_s, h_t, y = heads(3, n=10)
    with torch.no_grad():
        z_s, z_t = student(h_s).float(), teacher(h_t).float()
    raw = torch.tensor(naive_influence(student, teacher, h_s, h_t, y))
    spec = FisherSpec(axis="sample", estimator="influence")
    weights, stats = FisherWeighter(spec, "kd")(FisherBatch(torch.zeros(10, 1), nn.Identity(), z_t, y,
                                                            student_logits=z_s))
    assert weights.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(weights, normalize(raw, 1.0, 1.0), atol=1e-4)
    assert {"entropy", "max_min", "ess"} <= set(stats)


def test_a_sample_against_the_rest_of_the_batch_gets_the_smallest_weight():
    # eight samples whose student is confidently wrong in the same way, and one whose gradient points the other way
    teacher = torch.zeros(9, 3)
    student = torch.tensor([[0.0, 3.0, 0.0]] * 8 + [[3.0, 0.0, 0.0]])
    y = torch.tensor([0] * 8 + [1])
    w = E.influence_weight(student, teacher, y)
    assert w.argmin().item() == 8 and (w[:8] > 0.5).all() and w[8] < 0.5


def test_an_unlabelled_row_is_scored_against_the_teachers_top_class():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    y = torch.randint(0, 4, (5,), generator=g)
    hidden = y.clone()
    hidden[2] = -100
    y[2] = t[2].argmax()
    torch.testing.assert_close(E.influence_weight(s, t, hidden), E.influence_weight(s, t, y))


def test_through_the_distiller_weights_have_mean_one_and_scale_kd():
    torch.manual_seed(0)
    student, teacher = create_model("mlp", 1, 5, hidden=(8,)), create_model("mlp", 1, 5, hidden=(16,))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 40, generator=g), torch.randint(0, 5, (12,), generator=g)
    kd = {"name": "kd", "weight": 1.0, "fisher": {"axis": "sample", "estimator": "influence", "clip": list(WIDE)}}
    distiller = Distiller(student, teacher, [kd])
    out = distiller(x, y)
    w = distiller.fisher["kd"].last_weights
    assert w.shape == (12,) and w.mean().item() == pytest.approx(1.0, abs=1e-5)
    s, t = out.logits.detach().double(), out.teacher_logits.double()
    expected_w = normalize(E.influence_weight(s, t, y), 1.0, 1.0, clip=WIDE).double()
    log_pt, log_ps = (t / 4).log_softmax(-1), (s / 4).log_softmax(-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    assert out.losses["kd"].item() == pytest.approx(16 * (expected_w * kl).mean().item(), rel=1e-4)
    out.loss.backward()
    with pytest.raises(ValueError, match="the influence estimator needs labels"):
        distiller(x)


def test_one_line_errors():
    with pytest.raises(ValidationError, match="damping applies to estimator influence only"):
        FisherSpec(axis="sample", estimator="wsl", damping=0.1)
    with pytest.raises(ValidationError, match="damping applies to estimator influence only"):
        FisherSpec(axis="class", damping=0.1)
    with pytest.raises(ValidationError, match="greater than 0"):
        FisherSpec(axis="sample", estimator="influence", damping=0.0)
    with pytest.raises(ValidationError, match="axis 'class' takes the estimators"):
        FisherSpec(axis="class", estimator="influence")
    spec = FisherSpec(axis="sample", estimator="influence")
    tokens = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="the influence estimator weighs whole samples: it needs logits B×C"):
        FisherWeighter(spec, "kd")(FisherBatch(tokens, nn.Identity(), tokens, torch.zeros(2, 3).long(),
                                               student_logits=tokens))
    with pytest.raises(ValueError, match="reads the student's logits"):
        FisherWeighter(spec, "kd")(FisherBatch(torch.zeros(2, 4), nn.Identity(), torch.randn(2, 4),
                                               torch.tensor([0, 1])))


@pytest.mark.parametrize("block", [{"axis": "sample", "estimator": "influence"},
                                   {"axis": "sample", "estimator": "influence", "damping": 0.3, "gamma": 0.5}])
def test_a_saved_influence_block_validates_again_unchanged(block):
    spec = FisherSpec(**block)
    assert FisherSpec.model_validate(spec.model_dump(mode="json")) == spec
    assert spec.resolved_estimator == "influence"
