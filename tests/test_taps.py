import pytest
import torch
from torch import nn

from fisherkd.taps import Taps


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Sequential(nn.Linear(4, 6), nn.ReLU()), nn.Sequential(nn.Linear(6, 3)))
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        return self.out(self.body(x))


def test_plain_and_nested_sequential_outputs_and_inputs():
    model = Nested()
    x = torch.randn(5, 4)
    with Taps(model, ["body.0.0", "body.1", "out:in", "out"]) as taps:
        y = model(x)
        first = model.body[0][0](x)
        assert torch.equal(taps["body.0.0"], first)
        assert torch.equal(taps["body.1"], model.body(x))
        assert torch.equal(taps["out:in"], model.body(x))  # the input of `out`
        assert torch.equal(taps["out"], y)
    assert not any(m._forward_hooks for m in model.modules())


def test_unknown_module_lists_close_names():
    with pytest.raises(KeyError, match=r"student has no module 'body.1.1'.*did you mean: .*body\.1\.0"):
        Taps(Nested(), ["body.1.1"], "student")


def test_tuple_outputs_and_bad_index():
    class Pair(nn.Module):
        def forward(self, x):
            return x + 1, x * 2

    model = nn.Sequential(Pair())
    with Taps(model, ["0", "0:1"]) as taps:
        model(torch.full((2,), 3.0))
        assert torch.equal(taps["0"], torch.full((2,), 4.0)) and torch.equal(taps["0:1"], torch.full((2,), 6.0))
    with pytest.raises(ValueError, match="index"):
        Taps(model, ["0:x"])


def test_module_that_did_not_run_is_reported():
    model = Nested()
    with Taps(model, ["out"]) as taps, pytest.raises(RuntimeError, match="did not run"):
        taps["out"]


def test_transformers_model_from_tiny_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        attn_implementation="eager",
    )
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 50, (2, 7))
    with Taps(model, ["encoder.layer.1", "encoder.layer.0.attention.self:1", "embeddings"]) as taps:
        out = model(input_ids=ids, output_attentions=True)
        assert torch.equal(taps["encoder.layer.1"], out.last_hidden_state)
        assert taps["encoder.layer.0.attention.self:1"].shape == (2, 2, 7, 7)
        assert torch.allclose(taps["encoder.layer.0.attention.self:1"], out.attentions[0])
        assert taps["embeddings"].shape == (2, 7, 16)
