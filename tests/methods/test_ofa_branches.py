"""OFA-KD whole (``ofa_branches``): branch heads on student stages, each trained with the OFA adaptive-target loss.

References: a Python loop over floats for the OFA loss (``naive_logits``), the branch logits recomputed here from
stage features captured by this file's own forward hooks, the authors' branch layout counted by hand.
"""

import math

import pytest
import torch
from naive_logits import labels, mean, rows, softmax
from torch import nn

from fisherkd import functional as Fn
from fisherkd.distiller import Distiller
from fisherkd.methods import create
from fisherkd.methods.ofa_kd import SepConv, TokenBranch
from fisherkd.models import create_model
from helpers import TinyCNN, assert_trains, tiny_image_batch


def naive_ofa(s, t, y, eps: float, tau: float = 1.0, w=None) -> float:
    """mean_n w_n·(−Σ_c [(p_t,c + 1[c=y])^ε − 1[c=y]]·log p_s,c), one sample at a time."""
    weights = [1.0] * len(labels(y)) if w is None else w.double().tolist()
    per_sample = []
    for zs, zt, label, wn in zip(rows(s), rows(t), labels(y), weights):
        ps, pt = softmax(zs, tau), softmax(zt, tau)
        hot = [1.0 if c == label else 0.0 for c in range(len(ps))]
        per_sample.append(-wn * sum(((pt[c] + hot[c]) ** eps - hot[c]) * math.log(ps[c]) for c in range(len(ps))))
    return mean(per_sample)


class Capture:
    """Forward hooks of this test (not the library's taps): the latest output of each named student module."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.out: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(_m, _i, output):
            self.out[name] = output
        return hook


def fmnist_batch(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_functional_branch_loss_is_the_sum_of_ofa_over_branches():
    g = torch.Generator().manual_seed(0)
    branches = [torch.randn(5, 7, generator=g) for _ in range(3)]
    t, y = torch.randn(5, 7, generator=g), torch.randint(0, 7, (5,), generator=g)
    expected = sum(naive_ofa(b, t, y, 1.5, 2.0) for b in branches)
    assert math.isclose(Fn.ofa_branches(branches, t, y, 1.5, 2.0).item(), expected, rel_tol=1e-5)
    with pytest.raises(ValueError, match="no branch logits"):
        Fn.ofa_branches([], t, y)


@pytest.mark.parametrize(
    ("student_name", "stages", "kwargs"),
    [
        ("mlp", ["features.2", "features.4"], {"in_features": 784, "hidden": (32, 24)}),  # CNN -> MLP
        ("vit_tiny", ["blocks.1", "blocks.3"], {"image_size": 28, "dim": 32, "depth": 4}),  # CNN -> ViT
        ("resnet8", ["layer1", "layer2", "layer3"], {}),  # CNN -> CNN (maps)
    ],
)
def test_each_branch_term_is_the_ofa_loss_of_its_heads_logits(student_name, stages, kwargs):
    torch.manual_seed(0)
    x, y = fmnist_batch()
    teacher = create_model("cnn_small", 1, 10, head="gap")
    student = create_model(student_name, 1, 10, **kwargs)
    spec = {"name": "ofa_branches", "eps": 1.5, "pairs": [[s, ""] for s in stages]}
    distiller = Distiller(student, teacher, [spec], example_input=x[:2])
    capture = Capture(student, stages)
    out = distiller(x, y)
    method = distiller.methods[0]
    with torch.no_grad():
        logits = [method.branches[k](capture.out[s]) for k, s in enumerate(stages)]
    expected = sum(naive_ofa(z, out.teacher_logits, y, 1.5) for z in logits)
    assert out.losses["ofa_branches"].item() == pytest.approx(expected, rel=1e-5)
    assert out.losses["ofa_logits"].item() == pytest.approx(naive_ofa(out.logits, out.teacher_logits, y, 1.5), rel=1e-5)
    distiller.close()


def test_branch_layouts_follow_the_authors():
    torch.manual_seed(0)
    x, _ = fmnist_batch(2)
    teacher = create_model("resnet_fmnist", 1, 10)  # final width 128
    # maps 28, 14, 7 -> 2, 1, 0 stride-2 blocks (the authors' 4 − stage), channels doubling, the last to 128
    resnet = create_model("resnet8", 1, 10)
    pairs = [["layer1", ""], ["layer2", ""], ["layer3", ""]]
    d = Distiller(resnet, teacher, [{"name": "ofa_branches", "pairs": pairs}], example_input=x)
    blocks = [[m for m in b if isinstance(m, SepConv)] for b in d.methods[0].branches]
    assert [len(b) for b in blocks] == [2, 1, 0]
    assert [(b[0][0].in_channels, b[-1][5].out_channels) for b in blocks[:2]] == [(16, 128), (32, 128)]
    assert blocks[0][0][5].out_channels == 32  # the first of two blocks doubles 16 -> 32
    assert isinstance(d.methods[0].branches[2][0], nn.Conv2d) and d.methods[0].branches[2][0].kernel_size == (1, 1)
    # tokens: k = 4 pairs listed shallow to deep get 3, 2, 1, 1 transformer blocks; ViT has a class token
    vit = create_model("vit_tiny", 1, 10, image_size=28, dim=32)
    d = Distiller(vit, teacher, [{"name": "ofa_branches", "pairs": [[s, ""] for s in vit.stages]}], example_input=x)
    branches = d.methods[0].branches
    assert all(isinstance(b, TokenBranch) for b in branches)
    assert [len(b.blocks) for b in branches] == [3, 2, 1, 1] and {b.pool for b in branches} == {"first"}
    assert branches[0].head.in_features == 32 and branches[0].head.out_features == 10
    # vectors: an MLP, hidden = max(widest student stage, teacher's final width)
    mlp = create_model("mlp", 1, 10, in_features=784, hidden=(32,))
    d = Distiller(mlp, teacher, [{"name": "ofa_branches", "pairs": [["features.2", ""]]}], example_input=x)
    (branch,) = d.methods[0].branches
    assert [type(m) for m in branch] == [nn.Linear, nn.GELU, nn.Linear] and branch[0].out_features == 128


def test_gradients_reach_the_stage_features_through_the_branch_alone():
    torch.manual_seed(0)
    x, y = fmnist_batch()
    student, teacher = create_model("resnet8", 1, 10), create_model("cnn_small", 1, 10, head="gap")
    spec = {"name": "ofa_branches", "final": False, "pairs": [["layer1", ""]]}
    distiller = Distiller(student, teacher, [spec], example_input=x[:2])
    capture = Capture(student, ["layer1"])
    out = distiller(x, y)
    assert set(out.losses) == {"ofa_branches"}
    feature = capture.out["layer1"]
    (grad,) = torch.autograd.grad(out.loss, feature, retain_graph=True)
    assert grad.abs().sum() > 0
    out.loss.backward()
    first_conv = next(m for m in student.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
    # nothing after the tapped stage is trained by the branch term
    assert student.head.weight.grad is None or student.head.weight.grad.abs().sum() == 0
    assert all(p.grad is not None for p in distiller.methods[0].branches.parameters())


def test_branches_are_training_only():
    x, y = tiny_image_batch()
    student, teacher = TinyCNN(width=4), TinyCNN(width=8)
    distiller = Distiller(student, teacher, ["ce", {"name": "ofa_branches", "pairs": [["block1", ""]]}], x[:2])
    branch_ids = {id(p) for p in distiller.methods[1].branches.parameters()}
    assert branch_ids <= {id(p) for p in distiller.trainable_parameters()}  # trained with the student
    assert distiller.inference_model() is student  # predicts with the student alone
    assert not any(id(p) in branch_ids for p in student.parameters())
    assert any(k.startswith("methods.1.branches.") for k in distiller.training_state_dict())  # resumable


def test_sample_weights_reach_both_terms():
    torch.manual_seed(0)
    x, y = tiny_image_batch()
    distiller = Distiller(TinyCNN(width=4), TinyCNN(width=8), [{"name": "ofa_branches", "pairs": [["block2", ""]]}],
                          example_input=x[:2])
    capture = Capture(distiller.student, ["block2"])
    w = torch.linspace(0.2, 1.8, 16)
    out = distiller(x, y, weights={"sample": w})
    with torch.no_grad():
        branch = distiller.methods[0].branches[0](capture.out["block2"])
    t = out.teacher_logits
    assert out.losses["ofa_branches"].item() == pytest.approx(naive_ofa(branch, t, y, 1.0, w=w), rel=1e-5)
    assert out.losses["ofa_logits"].item() == pytest.approx(naive_ofa(out.logits, t, y, 1.0, w=w), rel=1e-5)


def test_defaults_errors_and_training():
    method = create("ofa_branches")
    h = method.hparams
    assert (h.eps, h.temperature, h.branch_weight, h.final) == (1.0, 1.0, 1.0, True) and method.default_weight == 1.0
    x, y = tiny_image_batch()
    with pytest.raises(ValueError, match="needs at least 1 layer pair"):
        Distiller(TinyCNN(width=4), TinyCNN(width=8), ["ofa_branches"], example_input=x[:2])
    with pytest.raises(RuntimeError, match="built from feature shapes"):
        method.branch_logits([torch.randn(2, 4)])
    headless = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(ValueError, match="set num_classes="):
        Distiller(headless, TinyCNN(width=8), [{"name": "ofa_branches", "pairs": [["0", ""]]}], example_input=x[:2])
    assert_trains({"name": "ofa_branches", "pairs": [["block1", ""], ["block2", ""]]})
