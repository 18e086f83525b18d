"""Layer-subset students of a Llama-style teacher: the teacher with the other blocks skipped."""

import copy

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from test_prune_hf import calibration, logits, tiny_llama  # noqa: E402

from fisherkd.hf.students import layer_subset_student, spread_layers  # noqa: E402


def test_spread_layers():
    assert spread_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert spread_layers(30, 6, "first") == [0, 1, 2, 3, 4, 5]
    assert spread_layers(4, 1) == [0] and spread_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="cannot keep 7 of 4 layers"):
        spread_layers(4, 7)
    with pytest.raises(ValueError, match="'even' or 'first'"):
        spread_layers(4, 2, "middle")


@pytest.mark.parametrize("layers", [[0, 2], 2, [1]])
def test_student_equals_the_teacher_with_the_other_blocks_skipped(tmp_path, layers):
    teacher = tiny_llama()
    total = teacher.config.num_hidden_layers
    kept = layers if isinstance(layers, list) else spread_layers(total, layers)
    reference = copy.deepcopy(teacher)
    reference.model.layers = torch.nn.ModuleList([reference.model.layers[i] for i in kept])
    reference.config.num_hidden_layers = len(kept)
    if getattr(reference.config, "layer_types", None):
        reference.config.layer_types = [teacher.config.layer_types[i] for i in kept]
    for i, layer in enumerate(reference.model.layers):
        layer.self_attn.layer_idx = i
    student = layer_subset_student(teacher, layers)
    assert student.config.num_hidden_layers == len(kept)
    batch = calibration()
    torch.testing.assert_close(logits(student, batch), logits(reference, batch))
    student.save_pretrained(tmp_path)
    again = type(student).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(again, batch), logits(reference, batch))
    with pytest.raises(ValueError, match="must lie in 0..2"):
        layer_subset_student(teacher, [1, 9])
