"""Structured pruning of a Llama-style causal LM (fisherkd.prune): heads by KV group, MLP neurons, hidden channels
and layers, on tiny random models built from a config (nothing downloaded)."""

import copy

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fisherkd.prune import importance, keep_units, prune, structures_of  # noqa: E402
from fisherkd.prune.hf import prune_causal_lm  # noqa: E402

VOCAB = 48


def tiny_llama(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=12,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        **overrides,
    )
    return transformers.LlamaForCausalLM(config).eval()


def calibration(seed: int = 0, n: int = 3, length: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length - 2 :] = 0  # right padding in one sequence
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits[batch["attention_mask"].bool()]


def one_live_structure_each(group: int = 1, neuron: int = 5, channel: int = 9):
    """A Llama whose only hidden channel with weights is ``channel``, whose layer 0 is all zero (an identity block),
    and whose other layers have one live KV group and one live MLP neuron."""
    model = tiny_llama()
    d, rep = 4, 2
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("model.layers.0."):
                p.zero_()
        dead = torch.ones(16, dtype=torch.bool)
        dead[channel] = False
        model.model.embed_tokens.weight[:, dead] = 0
        model.lm_head.weight[:, dead] = 0
        model.model.norm.weight[dead] = 0
        for layer in model.model.layers[1:]:
            attn, mlp = layer.self_attn, layer.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                lin.weight[:, dead] = 0
            for lin in (attn.o_proj, mlp.down_proj):
                lin.weight[dead] = 0
            layer.input_layernorm.weight[dead] = 0
            layer.post_attention_layernorm.weight[dead] = 0
            other = [g for g in range(2) if g != group]
            for g in other:
                attn.q_proj.weight[g * rep * d : (g + 1) * rep * d] = 0
                attn.o_proj.weight[:, g * rep * d : (g + 1) * rep * d] = 0
                attn.k_proj.weight[g * d : (g + 1) * d] = 0
                attn.v_proj.weight[g * d : (g + 1) * d] = 0
            off = torch.ones(12, dtype=torch.bool)
            off[neuron] = False
            mlp.gate_proj.weight[off] = 0
            mlp.up_proj.weight[off] = 0
            mlp.down_proj.weight[:, off] = 0
            # the live channel carries a signal the heads and the neuron can use
            mlp.gate_proj.weight[neuron, channel] = 2.0
            mlp.up_proj.weight[neuron, channel] = 2.0
    return model


@pytest.mark.parametrize("method", ["fisher", "empirical", "activation", "weight"])
def test_every_importance_but_random_keeps_the_only_head_neuron_channel_and_layer_that_matter(method):
    model = one_live_structure_each()
    pruned = prune(
        model,
        [calibration()],
        heads=0.5,
        neurons=1 / 12,
        hidden=1 / 16,
        layers=2,
        importance_method=method,
        layer_importance=method,
    )
    keep = {k: v.tolist() for k, v in pruned.keep.items()}
    assert keep["hidden"] == [9]
    assert keep["model.layers"] == [1, 2]
    for i in (1, 2):
        assert keep[f"model.layers.{i}.self_attn"] == [1]
        assert keep[f"model.layers.{i}.mlp"] == [5]
    batch = calibration(seed=1)
    torch.testing.assert_close(logits(pruned.model, batch), logits(model, batch), rtol=1e-4, atol=1e-5)


def zeroed_teacher(model, keep) -> transformers.LlamaForCausalLM:
    """The teacher with everything pruning removes zeroed by hand: the o_proj columns of pruned KV groups, the
    down_proj columns of pruned neurons, the residual-stream writes (embedding columns, o_proj / down_proj rows) of
    pruned hidden channels, the o_proj / down_proj of pruned layers (so they add nothing: identities)."""
    masked = copy.deepcopy(model)
    d, rep = 4, 2
    with torch.no_grad():
        hidden = torch.ones(16, dtype=torch.bool)
        hidden[keep["hidden"]] = False
        masked.model.embed_tokens.weight[:, hidden] = 0
        for i, layer in enumerate(masked.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            for g in set(range(2)) - set(keep[f"model.layers.{i}.self_attn"].tolist()):
                attn.o_proj.weight[:, g * rep * d : (g + 1) * rep * d] = 0
            neurons = torch.ones(12, dtype=torch.bool)
            neurons[keep[f"model.layers.{i}.mlp"]] = False
            mlp.down_proj.weight[:, neurons] = 0
            attn.o_proj.weight[hidden] = 0
            mlp.down_proj.weight[hidden] = 0
            if i not in keep["model.layers"].tolist():
                attn.o_proj.weight.zero_()
                mlp.down_proj.weight.zero_()
    return masked


@pytest.mark.parametrize("tied", [False, True])
def test_pruned_llama_equals_the_masked_teacher_and_round_trips_save_pretrained(tied, tmp_path):
    model = tiny_llama(tie_word_embeddings=tied)
    structures = structures_of(model)
    scores = {s.name: torch.rand(s.size, generator=torch.Generator().manual_seed(len(s.name))) for s in structures}
    keep = keep_units(structures, scores, {"head": 0.5, "neuron": 0.5, "hidden": 0.75}, layers=2)
    pruned = prune_causal_lm(model, keep)
    config = pruned.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 4)
    assert (config.intermediate_size, config.hidden_size, config.num_hidden_layers) == (6, 12, 2)
    assert type(pruned) is type(model)
    batch = calibration(seed=2)
    torch.testing.assert_close(logits(pruned, batch), logits(zeroed_teacher(model, keep), batch), rtol=1e-4, atol=1e-5)
    pruned.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(loaded, batch), logits(pruned, batch))


def per_sample_gate_fisher(model, batch, layer: int) -> torch.Tensor:
    """E_n[(∂ Σ_t log p(x_{t+1}|x_≤t)/∂ξ_g)²] for an explicit gate ξ on each KV group's context (the o_proj input of
    ``layer``), one sequence at a time, summing over its real next tokens."""
    o_proj = model.model.layers[layer].self_attn.o_proj
    total = torch.zeros(2)
    n = batch["input_ids"].shape[0]
    for i in range(n):
        gate = torch.ones(2, requires_grad=True)
        handle = o_proj.register_forward_pre_hook(lambda _m, a, gate=gate: (a[0] * gate.repeat_interleave(8),))
        try:
            ids, mask = batch["input_ids"][i : i + 1], batch["attention_mask"][i : i + 1]
            log_p = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits[0, :-1].float(), -1)
            picked = log_p.gather(-1, ids[0, 1:, None])[:, 0] * mask[0, 1:]
            (grad,) = torch.autograd.grad(picked.sum(), gate)
        finally:
            handle.remove()
        total += grad.pow(2) / n
    return total


def test_head_fisher_equals_the_squared_gradient_of_an_explicit_gate():
    model = tiny_llama()
    batch = calibration()
    structure = next(s for s in structures_of(model) if s.name == "model.layers.1.self_attn")
    got = importance(model, [structure], [batch], "empirical")[structure.name]
    expected = per_sample_gate_fisher(model, batch, 1)
    assert expected.min() > 1e-8  # both groups matter, so a wrong reduction over sequences or tokens cannot pass
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-9)


def test_block_importance_and_removal_loss_match_a_hand_computation():
    model = tiny_llama()
    batch = calibration()
    layers = next(s for s in structures_of(model) if s.kind == "layer")
    block = importance(model, [layers], [batch], "block")[layers.name]
    removal = importance(model, [layers], [batch], "removal")[layers.name]
    mask = batch["attention_mask"].float()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        full = model(**batch, labels=labels).loss
        for i, layer in enumerate(model.model.layers):
            seen = {}
            handle = layer.register_forward_hook(lambda _m, a, out, seen=seen: seen.update(x=a[0], y=out))
            model(**batch)
            handle.remove()
            cos = F.cosine_similarity(seen["x"], seen["y"], dim=-1)  # B × T
            per_sample = ((1 - cos) * mask).sum(1) / mask.sum(1)
            assert block[i].item() == pytest.approx(per_sample.mean().item(), rel=1e-5)
            handle = layer.register_forward_hook(lambda _m, a, out: a[0])  # the block removed: an identity
            skipped = model(**batch, labels=labels).loss
            handle.remove()
            assert removal[i].item() == pytest.approx((skipped - full).item(), abs=1e-5)


def test_keeping_more_layers_than_the_teacher_has_is_refused():
    with pytest.raises(
        ValueError, match="layers=5: the teacher has 3 blocks, 0 of which change the shape and stay: keep 1 to 3"
    ):
        prune(tiny_llama(), [calibration()], layers=5, importance_method="weight")


def test_unsupported_models_are_refused_in_one_line():
    with pytest.raises(TypeError, match="supports the zoo's mlp, cnn1d and CIFAR ResNets .* and Llama-style"):
        prune(torch.nn.Linear(3, 3), [(torch.zeros(1, 3), None)], name="linear")
