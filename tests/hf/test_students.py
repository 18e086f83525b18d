"""Students of a Llama-style teacher: layer subsets (the teacher with the other blocks skipped) and students pruned
by a run config's ``from_teacher`` block (equal to :func:`fisherkd.prune.prune` on the same calibration)."""

import copy

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
import yaml  # noqa: E402
from test_prune_hf import calibration, logits, tiny_llama  # noqa: E402

from fisherkd.config import ConfigError, FromTeacherConfig  # noqa: E402
from fisherkd.hf.students import layer_subset_student, pad_batch, spread_layers, student_from_teacher  # noqa: E402
from fisherkd.prune import prune  # noqa: E402


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


# student_from_teacher: the HF side of a run config's student: {from_teacher: {...}}

SPEC = """
student:
  from_teacher: {layers: 2, width: 0.5, importance: activation, layer_importance: block, calibration: 64}
"""


def examples(n: int = 5, seed: int = 3, lengths=None) -> list[dict]:
    """Tokenized examples as a dataset holds them: lists of ints, of different lengths unless ``lengths`` is one."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [3 + i % 5 for i in range(n)]
    return [
        {"input_ids": torch.randint(0, 48, (length,), generator=g).tolist(), "text": "ignored"} for length in lengths
    ]


def test_a_yaml_spec_gives_the_student_prune_gives_on_the_unpadded_examples(tmp_path):
    teacher = tiny_llama()
    batch = calibration(seed=4)
    before = logits(teacher, batch)
    spec = yaml.safe_load(SPEC)["student"]["from_teacher"]
    data = examples()
    student = student_from_teacher(teacher, spec, data, batch_size=2)  # padded batches of 2 different lengths
    config = student.config
    assert type(student) is type(teacher)
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (2, 8, 6)
    assert (config.num_attention_heads, config.num_key_value_heads) == (2, 1)  # half of the 2 KV groups
    # calibration 64 > 5 examples: all of them; activation and block importance are sums over examples, so one
    # unpadded example per batch must rank the same units as padded batches in any order
    one_each = [{"input_ids": torch.tensor([e["input_ids"]])} for e in data]
    expected = prune(
        teacher, one_each, width=0.5, layers=2, importance_method="activation", layer_importance="block"
    ).model
    torch.testing.assert_close(logits(student, batch), logits(expected, batch), rtol=0, atol=0)
    torch.testing.assert_close(logits(teacher, batch), before, rtol=0, atol=0)  # the teacher is left as it was
    student.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(again) is type(teacher)
    torch.testing.assert_close(logits(again, batch), logits(student, batch))


def test_the_fisher_sample_is_seeded_and_a_tokenizer_output_works_like_its_rows():
    teacher = tiny_llama()
    data = examples(n=6, lengths=[6] * 6)
    spec = {"width": 0.5, "layers": 2, "importance": "fisher", "calibration": 3, "seed": 5}
    student = student_from_teacher(teacher, spec, data, batch_size=3)
    # the documented sample: torch.randperm(6) seeded by the spec's seed, its first 3, in that order, one batch
    chosen = torch.randperm(6, generator=torch.Generator().manual_seed(5))[:3].tolist()
    batch = {"input_ids": torch.tensor([data[i]["input_ids"] for i in chosen])}
    expected = prune(teacher, [batch], width=0.5, layers=2, importance_method="fisher", seed=5).model
    check = calibration(seed=4)
    torch.testing.assert_close(logits(student, check), logits(expected, check), rtol=0, atol=0)
    columns = {"input_ids": torch.tensor([e["input_ids"] for e in data]), "attention_mask": torch.ones(6, 6)}
    from_columns = student_from_teacher(teacher, spec, columns, batch_size=3)
    torch.testing.assert_close(logits(from_columns, check), logits(student, check), rtol=0, atol=0)


def test_the_spec_round_trips_through_model_dump():
    teacher = tiny_llama()
    spec = FromTeacherConfig.model_validate(yaml.safe_load(SPEC)["student"]["from_teacher"])
    dumped = yaml.safe_load(yaml.safe_dump(spec.model_dump(mode="json")))
    assert FromTeacherConfig.model_validate(dumped) == spec
    check, data = calibration(seed=4), examples()
    a = student_from_teacher(teacher, spec, data)
    b = student_from_teacher(teacher, dumped, data)
    torch.testing.assert_close(logits(a, check), logits(b, check), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ({"lyers": 2}, ConfigError, "config error at from_teacher.lyers: unknown key; did you mean: layers"),
        ({"width": 2}, ConfigError, "config error at from_teacher.width: Input should be less than or equal to 1"),
        ({"importance": "fishr"}, ConfigError, "config error at from_teacher.importance: Input should be"),
        ({"layers": 9}, ValueError, "layers=9: the teacher has 3 blocks"),
    ],
)
def test_a_bad_spec_is_one_line(spec, error, message):
    with pytest.raises(error) as info:
        student_from_teacher(tiny_llama(), spec, examples())
    assert message in str(info.value) and "\n" not in str(info.value)


def test_pad_batch_pads_right_and_masks_the_padding():
    batch = pad_batch([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    with pytest.raises(ValueError, match="example 1 has no input_ids"):
        pad_batch([{"input_ids": [1]}, {"text": "hi"}], 0)
    with pytest.raises(ValueError, match="labels to all or none"):
        pad_batch([{"input_ids": [1], "labels": [1]}, {"input_ids": [2]}], 0)
