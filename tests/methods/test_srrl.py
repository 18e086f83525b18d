import math

import pytest
import torch

from fisherkd import functional as Fn
from fisherkd.distiller import Distiller
from fisherkd.methods import describe
from helpers import TinyCNN, assert_trains, tiny_image_batch


def test_srrl_loss_on_a_hand_computed_case():
    s = torch.tensor([[1.0, 2.0]])
    t = torch.tensor([[0.0, 2.0]])
    W = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    b = torch.tensor([0.5, 0.0, 1.0])
    z_t = torch.tensor([[1.0, 3.0, 0.0]])
    # feature: ((1−0)² + 0)/2 = 0.5; W·s + b = (1.5, 3, −1): ((0.5)² + 0 + 1)/3 = 1.25/3
    assert math.isclose(Fn.srrl(s, t, z_t, W, b).item(), 0.5 + 1.25 / 3, rel_tol=1e-6)
    value = Fn.srrl(s, t, z_t, W, b, feature_weight=2.0, logit_weight=3.0).item()
    assert math.isclose(value, 2 * 0.5 + 3 * 1.25 / 3, rel_tol=1e-6)


def naive_srrl(s, t, z_t, W, b, sample_weight):
    total = 0.0
    for n in range(s.shape[0]):
        sn, tn, zn = s[n].tolist(), t[n].tolist(), z_t[n].tolist()
        logits = [sum(w * x for w, x in zip(row, sn)) + bc for row, bc in zip(W.tolist(), b.tolist())]
        feature = sum((a - c) ** 2 for a, c in zip(sn, tn)) / len(sn)
        regression = sum((a - c) ** 2 for a, c in zip(logits, zn)) / len(zn)
        total += float(sample_weight[n]) * (feature + regression)
    return total / s.shape[0]


def test_srrl_matches_naive_loop_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (3, 4), (3, 5), (5, 4), (5,)]
    s, t, z, W, b = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in shapes)
    w = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    assert math.isclose(Fn.srrl(s, t, z, W, b, sample_weight=w).item(), naive_srrl(s, t, z, W, b, w), rel_tol=1e-9)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: Fn.srrl(x, t, z, W, b), (s,))
    with pytest.raises(ValueError, match="teacher logits"):
        Fn.srrl(s, t, z[:, :3], W, b)


def test_srrl_defaults_and_connector_are_the_authors():
    info = describe("srrl")
    assert info["defaults"] == {"feature_weight": 1.0, "logit_weight": 1.0, "head": None}
    assert (info["default_weight"], info["label_weight"], info["pairs"]) == (1.0, 1.0, ["vector", "map"])
    distiller = make_distiller(["pool", "pool"])
    conv, bn, relu = distiller.methods[0].projector
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.bias) == (8, 16, (1, 1), None)
    assert isinstance(bn, torch.nn.BatchNorm2d) and isinstance(relu, torch.nn.ReLU)
    assert abs(conv.weight.std().item() - math.sqrt(2 / 16)) < 0.1  # He init over the fan-out, as the authors
    distiller.close()


def make_distiller(pair):
    torch.manual_seed(0)
    x, _ = tiny_image_batch()
    return Distiller(TinyCNN(width=4), TinyCNN(width=8), [{"name": "srrl", "pairs": [pair]}], example_input=x[:2])


@pytest.mark.parametrize("pair", [["pool", "pool"], ["block2", "block2"]])
def test_srrl_method_is_connector_then_pool_then_teacher_head(pair):
    distiller = make_distiller(pair)
    distiller.eval()
    x, y = tiny_image_batch()
    with torch.no_grad():
        out = distiller(x, y).losses["srrl"]
        student, teacher = distiller.student, distiller.teacher
        s = student.block2(student.block1(x))
        t = teacher.block2(teacher.block1(x)).mean((2, 3))
        if pair[0] == "pool":
            s = s.mean((2, 3))[:, :, None, None]  # the penultimate vector as a 1×1 map (SimKD's re-implementation)
        h = distiller.methods[0].projector(s).mean((2, 3))
        z = h @ teacher.head.weight.T + teacher.head.bias
        expected = ((h - t) ** 2).mean() + ((z - teacher(x)) ** 2).mean()
    assert math.isclose(out.item(), expected.item(), rel_tol=1e-5)
    assert distiller.inference_model() is distiller.student  # SRRL keeps the student's own classifier
    distiller.close()


@pytest.mark.parametrize("pair", [["pool", "pool"], ["block2", "block2"]])
def test_srrl_trains(pair):
    assert_trains({"name": "srrl", "pairs": [pair]})
