import copy
import math

import pytest
import torch

from fisherkd import functional as Fn
from fisherkd.distiller import Distiller
from fisherkd.methods import describe, method_class
from helpers import TinyCNN, assert_trains, tiny_image_batch


def naive_head_kd(s, t, weight, bias, tau, anchor=0.0, sample_weight=None):
    """τ²·KL(p_t ‖ softmax((W·s + b)/τ)) + anchor·mean_d (s − t)², sample by sample, class by class, in Python."""
    W, b = weight.tolist(), bias.tolist()
    total = 0.0
    for n in range(s.shape[0]):
        sn, tn = s[n].tolist(), t[n].tolist()
        zs = [sum(W[c][d] * sn[d] for d in range(len(sn))) + b[c] for c in range(len(W))]
        zt = [sum(W[c][d] * tn[d] for d in range(len(tn))) + b[c] for c in range(len(W))]
        es, et = [math.exp(z / tau) for z in zs], [math.exp(z / tau) for z in zt]
        ps, pt = [e / sum(es) for e in es], [e / sum(et) for e in et]
        kl = sum(p * math.log(p / q) for p, q in zip(pt, ps))
        gap = sum((a - z) ** 2 for a, z in zip(sn, tn)) / len(sn)
        total += (1.0 if sample_weight is None else float(sample_weight[n])) * (tau**2 * kl + anchor * gap)
    return total / s.shape[0]


def test_head_kd_matches_naive_loop_with_anchor_and_sample_weights():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)
    W, b = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    w = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    assert math.isclose(Fn.head_kd(s, t, W, b, 4.0).item(), naive_head_kd(s, t, W, b, 4.0), rel_tol=1e-9)
    value = Fn.head_kd(s, t, W, b, 2.0, anchor_weight=0.3, sample_weight=w).item()
    assert math.isclose(value, naive_head_kd(s, t, W, b, 2.0, 0.3, w), rel_tol=1e-9)


def test_head_kd_second_order_form_is_the_head_fisher_metric():
    # Hand-built head: 3 classes on a 4-d feature. M = Wᵀ(diag p − ppᵀ)W/τ², and loss ≈ τ²·½·δᵀMδ for small δ.
    W = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 1.0, 1.0, -1.0], [2.0, 0.5, -1.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([0.1, -0.3, 0.2], dtype=torch.float64)
    h = torch.tensor([[0.4, -0.2, 1.0, 0.3]], dtype=torch.float64)
    tau = 2.0
    p = torch.softmax((h @ W.T + b)[0] / tau, 0)
    M = W.T @ (torch.diag(p) - torch.outer(p, p)) @ W / tau**2
    # the same metric as a covariance of the class rows under p: Cov_{c∼p}(w_c)/τ²
    mean_row = p @ W
    covariance = sum(p[c] * torch.outer(W[c] - mean_row, W[c] - mean_row) for c in range(3)) / tau**2
    torch.testing.assert_close(M, covariance)
    assert torch.linalg.matrix_rank(M).item() == 2  # rank C − 1
    direction = torch.tensor([0.3, 1.0, -0.7, 0.2], dtype=torch.float64)
    for scale in (1e-2, 1e-3):
        delta = scale * direction
        loss = Fn.head_kd(h + delta, h, W, b, tau).item()
        quadratic = tau**2 * 0.5 * (delta @ M @ delta).item()
        assert abs(loss - quadratic) < 10 * scale * quadratic  # the remainder is O(δ³)


def test_head_kd_is_blind_to_the_null_space_of_the_head_metric():
    W = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    b = torch.zeros(2, dtype=torch.float64)
    h = torch.tensor([[0.5, -1.0, 0.25]], dtype=torch.float64)
    unseen = torch.tensor([[2.0, 1.0, -1.0]], dtype=torch.float64)  # W·unseen = 0
    shift = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)  # W·shift = (1, 1): softmax ignores it
    assert Fn.head_kd(h + unseen, h, W, b).item() < 1e-24
    assert Fn.head_kd(h + 3 * shift, h, W, b).item() < 1e-24
    assert Fn.head_kd(h + unseen, h, W, b, anchor_weight=1.0).item() == pytest.approx(2.0)  # mean of 4, 1, 1


def test_head_kd_gradcheck():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t, W, b = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in [(3, 5), (4, 5), (4,)])
    assert torch.autograd.gradcheck(lambda x: Fn.head_kd(x, t, W, b, 3.0, anchor_weight=0.1), (s,))


def test_head_kd_rejects_mismatched_feature_and_classifier():
    with pytest.raises(ValueError, match="cannot read features of width 5"):
        Fn.head_kd(torch.randn(2, 5), torch.randn(2, 5), torch.randn(3, 4))
    with pytest.raises(ValueError, match="student feature"):
        Fn.head_kd(torch.randn(2, 5), torch.randn(2, 6), torch.randn(3, 5))


def test_head_kd_defaults_are_pinned():
    info, cls = describe("head_kd"), method_class("head_kd")
    assert info["defaults"] == {
        "temperature": 4.0,
        "anchor_weight": 0.0,
        "head": None,
        "predict_with_teacher_head": False,
    }
    assert (info["default_weight"], info["label_weight"], info["pairs"]) == (1.0, 1.0, ["vector", "map"])
    assert (cls.adapter, cls.min_pairs, cls.max_pairs) == ("student_to_teacher", 1, 1)


def distiller_for(spec, student=None, teacher=None):
    torch.manual_seed(0)
    x, _ = tiny_image_batch()
    return Distiller(student or TinyCNN(width=4), teacher or TinyCNN(width=8), [spec], example_input=x[:2])


def test_head_kd_is_zero_when_the_projection_is_the_identity_and_the_student_is_the_teacher():
    teacher = TinyCNN(width=8)
    distiller = distiller_for({"name": "head_kd", "pairs": [["head:in", "head:in"]]}, copy.deepcopy(teacher), teacher)
    adapter = distiller.adapters["m0_p0"]
    with torch.no_grad():
        adapter.weight.copy_(torch.eye(16))
        adapter.bias.zero_()
    distiller.eval()  # the student's BatchNorm uses the running statistics, as the frozen teacher's does
    x, y = tiny_image_batch()
    assert distiller(x, y).losses["head_kd"].item() == 0.0
    with torch.no_grad():
        adapter.weight.neg_()  # a projection that is not the identity costs something
    assert distiller(x, y).losses["head_kd"].item() > 1e-5
    distiller.close()


def test_head_kd_reads_the_teacher_head_and_matches_the_formula_on_maps():
    distiller = distiller_for({"name": "head_kd", "pairs": [["block2", "block2"]], "temperature": 2.0})
    method, teacher = distiller.methods[0], distiller.teacher
    assert method.classifier is teacher.head
    x, y = tiny_image_batch()
    w = torch.linspace(0.5, 1.5, len(y))  # importance weights by sample (a Fisher block's), mean 1
    with torch.no_grad():
        out = distiller(x, y, weights={"sample": w}).losses["head_kd"]
        student_map = distiller.student.block2(distiller.student.block1(x))
        teacher_map = teacher.block2(teacher.block1(x))
        projected = distiller.adapters["m0_p0"](student_map).mean((2, 3))
        W, b = teacher.head.weight.double(), teacher.head.bias.double()
        expected = naive_head_kd(projected.double(), teacher_map.mean((2, 3)).double(), W, b, 2.0, sample_weight=w)
    assert math.isclose(out.item(), expected, rel_tol=1e-5)
    distiller.close()


def test_head_kd_classifier_stays_frozen_and_out_of_the_optimizer():
    distiller = distiller_for({"name": "head_kd", "pairs": [["pool", "head:in"]]})
    head = distiller.teacher.head
    trainable = {id(p) for p in distiller.trainable_parameters()}
    assert id(head.weight) not in trainable and id(head.bias) not in trainable
    assert not any(k.startswith("methods.") for k in distiller.state_dict())  # no second copy of the head
    before = head.weight.clone()
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1)
    x, y = tiny_image_batch()
    distiller(x, y).loss.backward()
    optimizer.step()
    assert head.weight.grad is None and torch.equal(head.weight, before)
    distiller.close()


def test_head_kd_finds_the_named_head_or_says_which_names_exist():
    class TwoHeads(TinyCNN):
        def __init__(self):
            super().__init__(width=8)
            self.aux = torch.nn.Linear(16, 5)

    teacher = TwoHeads()
    default = distiller_for({"name": "head_kd", "pairs": [["pool", "pool"]]}, teacher=teacher)
    assert default.methods[0].classifier is teacher.aux  # the last nn.Linear taking 16 features
    named = distiller_for({"name": "head_kd", "pairs": [["pool", "pool"]], "head": "head"}, teacher=teacher)
    assert named.methods[0].classifier is teacher.head
    with pytest.raises(ValueError, match="no module 'haed'.*did you mean: head"):
        distiller_for({"name": "head_kd", "pairs": [["pool", "pool"]], "head": "haed"})
    with pytest.raises(ValueError, match="'block2' is a Sequential, not the nn.Linear"):
        distiller_for({"name": "head_kd", "pairs": [["pool", "pool"]], "head": "block2"})
    with pytest.raises(ValueError, match=r"no nn.Linear of the teacher takes the tapped feature's 8 .*head \(16\)"):
        distiller_for({"name": "head_kd", "pairs": [["block1", "block1"]]})


def test_head_kd_can_predict_with_the_teacher_head():
    distiller = distiller_for({"name": "head_kd", "pairs": [["pool", "pool"]], "predict_with_teacher_head": True})
    x, _ = tiny_image_batch()
    distiller.eval()
    with torch.no_grad():
        student = distiller.student
        expected = distiller.teacher.head(distiller.adapters["m0_p0"](student.pool(student.block2(student.block1(x)))))
        torch.testing.assert_close(distiller.inference_model()(x), expected)
    plain = distiller_for({"name": "head_kd", "pairs": [["pool", "pool"]]})
    assert plain.inference_model() is plain.student


@pytest.mark.parametrize("pair", [["pool", "head:in"], ["block2", "block2"]])
def test_head_kd_trains(pair):
    assert_trains({"name": "head_kd", "pairs": [pair]})
    assert_trains({"name": "head_kd", "pairs": [pair], "anchor_weight": 0.1})
