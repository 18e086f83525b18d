import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisherkd import functional as Fn
from fisherkd.data import ArrayDataset, DataSplits
from fisherkd.distiller import Distiller
from fisherkd.engine.trainer import evaluate
from fisherkd.methods import describe
from helpers import TinyCNN, assert_trains, tiny_image_batch


def test_simkd_loss_on_a_hand_computed_case():
    s = torch.tensor([[[[1.0, 2.0]], [[0.0, -1.0]]]])  # 1×2×1×2
    t = torch.tensor([[[[0.0, 4.0]], [[1.0, -1.0]]]])
    # squared gaps 1, 4, 1, 0 → mean 1.5
    assert Fn.simkd(s, t).item() == 1.5
    two = torch.cat([s, t])  # second sample: gap 0
    assert Fn.simkd(two, torch.cat([t, t]), sample_weight=torch.tensor([2.0, 0.0])).item() == 1.5
    with pytest.raises(ValueError, match="differ"):
        Fn.simkd(s, t[..., :1])


def test_simkd_defaults_and_projector_are_the_authors():
    info = describe("simkd")
    assert info["defaults"] == {"factor": 2, "head": None}
    assert (info["default_weight"], info["label_weight"], info["pairs"]) == (1.0, 0.0, ["map"])
    distiller = make_distiller()
    projector = distiller.methods[0].projector  # student 8 channels → teacher 16, bottleneck 16 / 2 = 8
    kinds = [type(m).__name__ for m in projector]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"] * 3
    convs = [(m.in_channels, m.out_channels, m.kernel_size, m.bias is None) for m in projector[::3]]
    assert convs == [(8, 8, (1, 1), True), (8, 8, (3, 3), True), (8, 16, (1, 1), True)]
    distiller.close()


class Wide(TinyCNN):
    """A student whose last map is twice the teacher's size (no pooling before block2)."""

    def __init__(self, width: int = 4) -> None:
        super().__init__(width=width)

    def forward(self, x):
        return self.head(self.pool(self.block2(self.block1(F.interpolate(x, scale_factor=2.0)))))


def make_distiller(student=None, teacher=None):
    torch.manual_seed(0)
    x, _ = tiny_image_batch()
    student, teacher = student or TinyCNN(width=4), teacher or TinyCNN(width=8)
    return Distiller(student, teacher, [{"name": "simkd", "pairs": [["block2", "block2"]]}], example_input=x[:2])


def student_map(student, x):
    return student.block2(student.block1(F.interpolate(x, scale_factor=2.0) if isinstance(student, Wide) else x))


def test_simkd_loss_pools_the_larger_map_then_projects():
    distiller = make_distiller(Wide())
    x, y = tiny_image_batch()
    out = distiller(x, y).losses["simkd"]
    with torch.no_grad():
        student = student_map(distiller.student, x)  # 16×16
        teacher = distiller.teacher.block2(distiller.teacher.block1(x))  # 8×8
        assert student.shape[-1] == 16 and teacher.shape[-1] == 8
        pooled = F.avg_pool2d(student, 2)  # the larger map average-pooled to the teacher's size
        expected = ((distiller.methods[0].projector(pooled) - teacher) ** 2).mean()
    assert math.isclose(out.item(), expected.item(), rel_tol=1e-5)
    distiller.close()


def test_simkd_inference_model_is_projector_then_pool_then_teacher_classifier():
    distiller = make_distiller(Wide())
    distiller.eval()
    x, _ = tiny_image_batch()
    model = distiller.inference_model()
    with torch.no_grad():
        pooled = F.avg_pool2d(student_map(distiller.student, x), 2)
        features = distiller.methods[0].projector(pooled).mean((2, 3))
        expected = features @ distiller.teacher.head.weight.T + distiller.teacher.head.bias
        torch.testing.assert_close(model(x), expected)
        traced = torch.jit.trace(model, x[:4])  # exportable as one module
        torch.testing.assert_close(traced(x), expected)
    distiller.close()


def test_simkd_inference_model_exports_to_onnx_and_torchscript(tmp_path):
    pytest.importorskip("onnxruntime")
    from fisherkd.export import export_onnx, export_torchscript

    distiller = make_distiller(Wide())
    distiller.eval()
    x, _ = tiny_image_batch()
    model = distiller.inference_model()
    with torch.no_grad():
        expected = model(x)
    for export, name in [(export_onnx, "model.onnx"), (export_torchscript, "model.pt")]:
        predict = export(model, x[:2], tmp_path / name)  # traced on 2 samples, run on 16: the batch axis is free
        torch.testing.assert_close(predict(x), expected, atol=1e-5, rtol=1e-4)
    distiller.close()


def test_engine_evaluation_reports_the_inference_model_accuracy():
    distiller = make_distiller()
    distiller.eval()
    x, _ = tiny_image_batch(n=32)
    with torch.no_grad():
        y = distiller.inference_model()(x).argmax(1)  # labels the reused teacher head gets right by construction
        wrong = (int(y[0]) + 1) % 5
        nn.init.zeros_(distiller.student.head.weight)
        distiller.student.head.bias.copy_(F.one_hot(torch.tensor(wrong), 5).float())  # its own head: one class
    own = (distiller.student(x).argmax(1) == y).float().mean().item()
    assert own < 1.0
    splits = DataSplits("toy", ArrayDataset(x, y), ArrayDataset(x, y), 5, (3, 8, 8))
    metrics = evaluate(distiller, splits, batch_size=8, amp="off")
    assert float(metrics["accuracy"]) == 1.0
    distiller.close()


def test_simkd_rejects_vectors_with_a_clear_message():
    x, _ = tiny_image_batch()
    with pytest.raises(ValueError, match="simkd: it projects B×C×H×W maps"):
        Distiller(TinyCNN(4), TinyCNN(8), [{"name": "simkd", "pairs": [["pool", "pool"]]}], example_input=x[:2])


def test_simkd_trains():
    losses = assert_trains({"name": "simkd", "pairs": [["block2", "block2"]]})
    assert losses[-1] < 0.5 * losses[0]
