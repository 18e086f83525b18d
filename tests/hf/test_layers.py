"""Layer maps and tap-name discovery for Hugging Face models (tiny configs built locally, nothing downloaded)."""

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from fisherkd.distiller import Distiller  # noqa: E402
from fisherkd.hf.layers import (  # noqa: E402
    attention_pairs,
    check_vocabularies,
    find_layers,
    hidden_pairs,
    layer_map,
    qkv_pairs,
)

VOCAB = 40


def tiny_bert(layers: int = 4, hidden: int = 16, heads: int = 2, num_labels: int = 3, **overrides):
    """A BertForSequenceClassification with eager attention and no dropout (so runs are deterministic)."""
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=16,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
        **overrides,
    )
    return transformers.BertForSequenceClassification(config)


def tiny_gpt2(layers: int = 2, hidden: int = 16, heads: int = 2, vocab: int = VOCAB, **overrides):
    """A GPT2LMHeadModel with eager attention and no dropout."""
    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
        **overrides,
    )
    return transformers.GPT2LMHeadModel(config)


def test_uniform_map_is_tinyberts_m_to_m_times_n_over_m():
    assert layer_map(3, 6) == [(0, 1), (1, 3), (2, 5)]
    assert layer_map(2, 12) == [(0, 5), (1, 11)]
    assert layer_map(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert layer_map(2, 5) == [(0, 1), (1, 4)]  # shares rounded down, the last student layer still ends the teacher
    with pytest.raises(ValueError, match="no more student layers"):
        layer_map(4, 2)


def test_last_and_explicit_maps():
    assert layer_map(3, 6, "last") == [(2, 5)]
    assert layer_map(3, 6, [(0, 0), (-1, -1)]) == [(0, 0), (2, 5)]
    with pytest.raises(ValueError, match="teacher index 6 is out of range for 6 layers"):
        layer_map(3, 6, [(0, 6)])
    with pytest.raises(ValueError, match="unknown layer-map strategy"):
        layer_map(3, 6, "middle")


def test_bert_pairs():
    student, teacher = tiny_bert(layers=2, hidden=8), tiny_bert(layers=4)
    assert hidden_pairs(student, teacher, embeddings=True) == [
        ("bert.encoder.layer.0:in", "bert.encoder.layer.0:in"),
        ("bert.encoder.layer.0", "bert.encoder.layer.1"),
        ("bert.encoder.layer.1", "bert.encoder.layer.3"),
    ]
    assert attention_pairs(student, teacher, "last") == [
        ("bert.encoder.layer.1.attention.self:1", "bert.encoder.layer.3.attention.self:1")
    ]
    assert qkv_pairs(student, teacher, kinds=("value",)) == [
        ("bert.encoder.layer.1.attention.self.value", "bert.encoder.layer.3.attention.self.value")
    ]


def test_gpt2_pairs_and_no_qkv():
    student, teacher = tiny_gpt2(layers=1, hidden=8), tiny_gpt2(layers=2)
    assert hidden_pairs(student, teacher, embeddings=True) == [
        ("transformer.h.0:in", "transformer.h.0:in"),
        ("transformer.h.0", "transformer.h.1"),
    ]
    assert attention_pairs(student, teacher) == [("transformer.h.0.attn:1", "transformer.h.1.attn:1")]
    with pytest.raises(ValueError, match="no separate query/key/value"):
        qkv_pairs(student, teacher)


def test_pairs_tap_the_right_shapes():
    student, teacher = tiny_bert(layers=2, hidden=8), tiny_bert(layers=4)
    pairs = hidden_pairs(student, teacher, embeddings=True) + attention_pairs(student, teacher)
    batch = {"input_ids": torch.randint(0, VOCAB, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    distiller = Distiller(student, teacher, [{"name": "tinybert", "pairs": pairs}], example_input=batch)
    distiller(batch)  # taps cleared afterwards: run the models again to look at them
    student(**batch)
    teacher(**batch)
    for s, t in pairs:
        expected = (2, 2, 5, 5) if s.endswith(":1") else (2, 5, 8)
        assert tuple(distiller.student_taps[s].shape) == expected
        assert distiller.teacher_taps[t].shape[:-1] == distiller.student_taps[s].shape[:-1]
    distiller.close()


def test_attention_pairs_need_eager_attention():
    student = tiny_bert(layers=2)
    student.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        attention_pairs(student, tiny_bert())


class TwoLists(nn.Module):
    def __init__(self, heads: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.heads = nn.ModuleList(nn.Linear(4, 2) for _ in range(heads))


def test_generic_models_find_known_names_or_list_candidates():
    assert find_layers(TwoLists())[0] == "blocks"
    model = nn.Module()
    model.stages, model.heads = nn.ModuleList([nn.Linear(2, 2)]), nn.ModuleList([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match=r"candidates: \['stages \(1 × Linear\)', 'heads \(1 × Linear\)'\]"):
        find_layers(model)
    assert find_layers(model, "stages")[0] == "stages"
    with pytest.raises(ValueError, match="has no ModuleList 'stage'"):
        find_layers(model, "stage")
    assert hidden_pairs(TwoLists(), TwoLists(), "last") == [("blocks.2", "blocks.2")]


def test_vocabulary_sizes_must_match_unless_truncation_is_allowed():
    with pytest.raises(ValueError, match="student vocabulary size 40 differs from teacher vocabulary size 48"):
        check_vocabularies(tiny_gpt2(vocab=40), tiny_gpt2(vocab=48))
    check_vocabularies(tiny_gpt2(vocab=40), tiny_gpt2(vocab=48), vocab_truncation=True)
