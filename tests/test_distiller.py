import pytest
import torch
from torch import nn

from fisherkd.distiller import Distiller
from helpers import TinyCNN, tiny_image_batch


class TeacherWithDropout(TinyCNN):
    def __init__(self) -> None:
        super().__init__(width=8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.head(self.drop(self.pool(self.block2(self.block1(x)))))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_teacher_is_frozen_in_eval_and_bit_identical_after_training():
    torch.manual_seed(0)
    teacher, student = TeacherWithDropout(), TinyCNN(width=4)
    teacher.train()  # the user hands over a teacher left in train mode
    before = snapshot(teacher)
    x, y = tiny_image_batch()
    specs = ["kd", {"name": "ce"}, {"name": "fitnet", "weight": 1.0, "pairs": [["block2", "block2"]]}]
    distiller = Distiller(student, teacher, specs, example_input=x[:2])
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1)
    distiller.train()
    for _ in range(3):
        out = distiller(x, y)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included
    # dropout stays off: the teacher's logits are deterministic across calls
    assert torch.equal(distiller.teacher_forward(x), distiller.teacher_forward(x))
    ids = {id(p) for p in teacher.parameters()}
    assert not any(id(p) in ids for p in distiller.trainable_parameters())


def test_forward_returns_logits_and_weighted_terms():
    torch.manual_seed(0)
    teacher, student = TinyCNN(width=8), TinyCNN(width=4)
    x, y = tiny_image_batch()
    distiller = Distiller(student, teacher, [{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9}])
    out = distiller(x, y)
    assert out.logits.shape == (16, 5) and out.teacher_logits.shape == (16, 5)
    assert set(out.losses) == {"ce", "kd"} and out.weights == {"ce": 0.1, "kd": 0.9}
    expected_ce = 0.1 * nn.functional.cross_entropy(student(x), y)
    assert torch.allclose(out.losses["ce"], expected_ce)
    assert torch.allclose(out.loss, out.losses["ce"] + out.losses["kd"])


def test_default_weight_is_the_authors_and_duplicate_methods_get_distinct_names():
    x, _ = tiny_image_batch()
    pairs1, pairs2 = [["block1", "block1"]], [["block2", "block2"]]
    specs = ["kd", {"name": "fitnet", "pairs": pairs1}, {"name": "fitnet", "pairs": pairs2}]
    distiller = Distiller(TinyCNN(4), TinyCNN(8), specs, example_input=x[:2])
    assert distiller.loss_weights == [0.9, 100.0, 100.0]
    out = distiller(x)
    assert set(out.losses) == {"kd", "fitnet", "fitnet_1.fitnet"}


def test_adapters_are_built_from_shapes_owned_and_saved():
    x, _ = tiny_image_batch()
    specs = [{"name": "fitnet", "pairs": [["block2", "block2"], ["head:in", "head:in"]]}]
    distiller = Distiller(TinyCNN(4), TinyCNN(8), specs, example_input=x[:2])
    conv, linear = distiller.adapters["m0_p0"], distiller.adapters["m0_p1"]
    assert isinstance(conv, nn.Conv2d) and (conv.in_channels, conv.out_channels) == (8, 16)
    assert isinstance(linear, nn.Linear) and (linear.in_features, linear.out_features) == (8, 16)
    state = distiller.training_state_dict()
    assert "adapters.m0_p0.weight" in state and not any(k.startswith("teacher.") for k in state)
    trainable = {id(p) for p in distiller.trainable_parameters()}
    assert id(conv.weight) in trainable


def test_shape_mismatch_names_both_layers_and_shapes():
    x, _ = tiny_image_batch()
    with pytest.raises(ValueError, match=r"'block1'.*'head:in'.*\[2, 4, 8, 8\].*\[2, 16\]"):
        Distiller(TinyCNN(4), TinyCNN(8), [{"name": "fitnet", "pairs": [["block1", "head:in"]]}], example_input=x[:2])


def test_unknown_names_list_nearest():
    with pytest.raises(KeyError, match="did you mean: kd"):
        Distiller(TinyCNN(4), TinyCNN(8), ["kdd"])
    with pytest.raises(TypeError, match="did you mean: temperature"):
        Distiller(TinyCNN(4), TinyCNN(8), [{"name": "kd", "temprature": 2}])
    with pytest.raises(KeyError, match="did you mean: block2"):
        Distiller(TinyCNN(4), TinyCNN(8), [{"name": "fitnet", "pairs": [["blok2", "block2"]]}])


def test_missing_teacher_pairs_or_labels_are_clear_errors():
    x, _ = tiny_image_batch()
    with pytest.raises(ValueError, match="needs a teacher"):
        Distiller(TinyCNN(4), None, ["kd"])
    with pytest.raises(ValueError, match="layer pair"):
        Distiller(TinyCNN(4), TinyCNN(8), ["fitnet"])
    with pytest.raises(ValueError, match="needs labels"):
        Distiller(TinyCNN(4), TinyCNN(8), ["ce"])(x)


def test_close_removes_every_hook():
    x, _ = tiny_image_batch()
    student, teacher = TinyCNN(4), TinyCNN(8)
    distiller = Distiller(student, teacher, [{"name": "fitnet", "pairs": [["block2", "block2"]]}], x[:2])
    assert student.block2._forward_hooks and teacher.block2._forward_hooks
    distiller.close()
    assert not any(m._forward_hooks for m in [*student.modules(), *teacher.modules()])
