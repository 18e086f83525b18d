import json
import math

import torch
from torch import nn

from fisherkd.config import build_config
from fisherkd.report import attention_agreement, cka_matrix, class_activation_map, map_agreement, write_report
from fisherkd.run import train
from fisherkd.schemes import EnsembleTeacher
from helpers import TinyCNN, tiny_image_batch


def test_map_agreement_on_hand_made_maps():
    a = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    b = torch.tensor([[0.0, 2.0, 0.0, 0.0]])
    iou, cosine = map_agreement(a, b)
    assert iou.item() == 0.5  # {1, 2} vs {1}
    assert math.isclose(cosine.item(), 1 / math.sqrt(2), rel_tol=1e-6)


class PoolLinear(nn.Module):
    """stage = identity on B×C×L; logits = W · mean_L(stage)."""

    def __init__(self) -> None:
        super().__init__()
        self.stage = nn.Identity()
        self.head = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return self.head(self.stage(x).mean(-1))


def test_grad_cam_matches_the_closed_form():
    torch.manual_seed(0)
    model, x = PoolLinear(), torch.randn(4, 3, 5)
    target = torch.tensor([0, 1, 1, 0])
    cam = class_activation_map(model, x, target, "stage")
    # ∂z_y/∂A_cl = W_yc / L, so α_c = W_yc / L and CAM_l = ReLU(Σ_c W_yc A_cl / L)
    weights = model.head.weight.detach()[target]
    expected = torch.relu((weights[:, :, None] * x).sum(1) / 5)
    assert torch.allclose(cam, expected, atol=1e-6)


def test_cka_of_a_model_with_itself_is_one_on_the_diagonal_and_attention_agrees():
    torch.manual_seed(0)
    model, (x, _) = TinyCNN(8).eval().requires_grad_(False), tiny_image_batch(32)  # frozen, like a teacher
    matrix, rows, cols = cka_matrix(model, model, x)
    assert rows == cols == ["block1", "block2", "head"]  # children with weights
    assert torch.allclose(matrix.diagonal(), torch.ones(3), atol=1e-5)
    agreement = attention_agreement(model, model, x)
    assert agreement["iou"] == 1.0 and abs(agreement["cosine"] - 1.0) < 1e-5
    assert agreement["teacher_layer"] == "block2"


def test_cka_and_attention_of_an_ensemble_teacher_use_its_members_stages():
    torch.manual_seed(0)
    members = [TinyCNN(8).eval().requires_grad_(False) for _ in range(2)]
    ensemble, (x, _) = EnsembleTeacher(members), tiny_image_batch(32)
    student = TinyCNN(4)
    matrix, rows, cols = cka_matrix(ensemble, student, x)
    assert rows == [f"members.{i}.{stage}" for i in range(2) for stage in ("block1", "block2", "head")]
    assert matrix.shape == (6, 3) and bool(((matrix > -1e-5) & (matrix < 1 + 1e-5)).all())
    own, _, _ = cka_matrix(members[1], student, x)  # member 1's rows are member 1 on its own
    assert torch.allclose(matrix[3:], own, atol=1e-5)
    agreement = attention_agreement(ensemble, student, x)
    assert agreement["teacher_layer"] == "members.1.block2" and 0 <= agreement["iou"] <= 1


def test_report_writes_pngs_and_markdown(tmp_path, monkeypatch):
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path / "cache"))
    config = build_config({
        "name": "r", "output_dir": str(tmp_path / "runs"),
        "teacher": {"name": "cnn1d", "train": {"epochs": 1, "batch_size": 200}},
        "student": {"name": "mlp"}, "methods": [{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9}],
        "train": {"epochs": 1, "batch_size": 200},
    })
    summary = train(config)
    out = write_report(summary["run_dir"], samples=64)
    text = (out / "report.md").read_text()
    for heading in ["Training curves", "Linear CKA", "Grad-CAM", "Error inheritance"]:
        assert heading in text
    assert (out / "cka.png").stat().st_size > 5000
    data = json.loads((out / "report.json").read_text())
    assert abs(data["test"]["accuracy"] - summary["test_accuracy"]) < 1e-6
    assert len(data["cka"]["matrix"]) == 3 and len(data["cka"]["matrix"][0]) == 2
