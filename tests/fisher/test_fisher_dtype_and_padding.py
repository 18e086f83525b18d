"""Fisher estimators with a half-precision teacher (they run in its dtype, accumulate in float32, and agree with
the float32 teacher to bf16 precision), and with right-padded token batches (a padded batch gives the statistics of
the same sequences without their pads, computed here by hand with plain autograd on each sequence alone)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fisherkd.fisher import FisherBatch, FisherSpec, FisherWeighter
from fisherkd.fisher import estimators as E
from fisherkd.models import create_model
from helpers import TinyCNN, forbid_host_reads

BF16 = torch.bfloat16


def close_in_bf16(low: Tensor, full: Tensor, rel: float = 0.05) -> None:
    """``low`` (from the bf16 teacher) is finite float32 and within ``rel`` of ``full`` in norm."""
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    error, size = (low - full).norm(), full.norm()
    assert error <= rel * size, f"relative error {error / size:.3g} > {rel}"


def twins(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    model = model.eval().requires_grad_(False)
    return model, copy.deepcopy(model).to(BF16)


def test_tap_estimators_run_in_a_bf16_teacher_and_match_the_float32_teacher():
    torch.manual_seed(0)
    full, low = twins(TinyCNN(8))
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    for target, tap in [(None, "block2"), (y, "block2"), (None, "head:in")]:  # sampled and empirical
        ((h, g),) = E.tapped_gradients(full, x, [tap], target=target, generator=torch.Generator().manual_seed(1))
        ((h_low, g_low),) = E.tapped_gradients(
            low, x.to(BF16), [tap], target=target, generator=torch.Generator().manual_seed(1)
        )
        close_in_bf16(h_low, h)
        close_in_bf16(g_low, g, rel=0.1)
        close_in_bf16(E.channel_fisher(g_low.pow(2)), E.channel_fisher(g.pow(2)), rel=0.1)
    (want,) = E.parameter_fisher(full, x, ["head.weight"], generator=torch.Generator().manual_seed(2))
    (got,) = E.parameter_fisher(low, x.to(BF16), ["head.weight"], generator=torch.Generator().manual_seed(2))
    close_in_bf16(got, want, rel=0.1)
    assert all(p.dtype == BF16 and not p.requires_grad for p in low.parameters())
    # closed forms on bf16 logits and a bf16 head weight
    logits, logits_low = full(x), low(x.to(BF16))
    close_in_bf16(E.logit_fisher_diagonal(logits_low), E.logit_fisher_diagonal(logits))
    close_in_bf16(E.logit_fisher_trace(logits_low), E.logit_fisher_trace(logits))
    close_in_bf16(E.linear_head_fisher(logits_low, low.head.weight), E.linear_head_fisher(logits, full.head.weight))


def test_head_gate_fisher_of_a_bf16_vit_matches_the_float32_vit():
    torch.manual_seed(0)
    full, low = twins(create_model("vit_tiny", 3, 5, dim=16, depth=1, heads=4))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    ((h, g),) = E.tapped_gradients(full, x, ["blocks.0.attn.probs"], target=y)
    ((h_low, g_low),) = E.tapped_gradients(low, x.to(BF16), ["blocks.0.attn.probs"], target=y)
    close_in_bf16(E.head_gate_fisher(h_low, g_low), E.head_gate_fisher(h, g), rel=0.1)


@pytest.mark.parametrize(
    "fisher",
    [
        {"axis": "channel", "estimator": "sampled"},
        {"axis": "channel", "estimator": "linear_head", "tap": "head:in"},
        {"axis": "class"},
        {"axis": "parameter"},
        {"axis": "position", "estimator": "empirical"},
    ],
    ids=lambda f: f"{f['axis']}-{f.get('estimator', '')}",
)
def test_weighters_accept_a_bf16_teacher(fisher):
    torch.manual_seed(0)
    full, low = twins(TinyCNN(8))
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    results = []
    for teacher, inputs in ((full, x), (low, x.to(BF16))):
        tap = fisher.get("tap", "block2")
        spec = FisherSpec(**{"tap": tap, **fisher}, every=1, fraction=1.0)
        weighter = FisherWeighter(spec, "test", parameter_names=["head.weight", "head.bias"])
        feature = teacher.pool(teacher.block2(teacher.block1(inputs))) if tap == "head:in" else None
        weights, _ = weighter(FisherBatch(inputs, teacher, teacher(inputs), y, feature=feature))
        results.append(weighter.statistic.read() if weighter.statistic is not None else weights)
    close_in_bf16(results[1], results[0], rel=0.1)


# -- padding -------------------------------------------------------------------------------------------------------


class TinyTokenModel(nn.Module):
    """Embedding → one causal two-head self-attention that ignores padded keys (taps ``probs``: B×H×T×T,
    ``block``: B×T×D) → per-token logits B×T×C, or with ``pool`` the mean over valid tokens → B×C."""

    def __init__(self, vocab: int = 11, dim: int = 8, heads: int = 2, pool: bool = False) -> None:
        super().__init__()
        self.heads, self.pool = heads, pool
        self.embed, self.qkv, self.proj = nn.Embedding(vocab, dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.probs, self.block = nn.Identity(), nn.Identity()
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        batch, length = input_ids.shape
        h = self.embed(input_ids)
        q, k, v = (t.reshape(batch, length, self.heads, -1).transpose(1, 2) for t in self.qkv(h).chunk(3, -1))
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        allowed = causal & attention_mask.bool()[:, None, None, :]
        scores = (q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
        context = (self.probs(scores.softmax(-1)) @ v).transpose(1, 2).reshape(batch, length, -1)
        h = self.block(torch.tanh(h + self.proj(context)))
        if self.pool:
            m = attention_mask[..., None].float()
            h = (h * m).sum(1) / m.sum(1)
        return self.head(h)


LENGTHS = (6, 4)  # the second sequence is right-padded with two pad tokens


def padded_batch(pool: bool = False) -> tuple[nn.Module, dict[str, Tensor], Tensor, list[tuple[dict, Tensor]]]:
    """(teacher, padded inputs, padded targets, [(inputs, target) of each sequence alone, unpadded])."""
    torch.manual_seed(0)
    teacher = TinyTokenModel(pool=pool).eval().requires_grad_(False)
    ids = torch.randint(1, 11, (2, 6))
    ids[1, 4:] = 0  # pads
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    target = torch.randint(0, 11, (2,) if pool else (2, 6))
    singles = [
        ({"input_ids": ids[i : i + 1, :n], "attention_mask": mask[i : i + 1, :n]},
         target[i : i + 1] if pool else target[i : i + 1, :n])
        for i, n in enumerate(LENGTHS)
    ]
    return teacher, {"input_ids": ids, "attention_mask": mask}, target, singles


def scores_by_hand(teacher: nn.Module, inputs: dict, target: Tensor, tap: str) -> tuple[Tensor, Tensor]:
    """(h, ∂ Σ log p(target) / ∂h) at the output of module ``tap``, by plain autograd."""
    seen = {}

    def keep(_module, _args, out):
        seen["h"] = out.detach().requires_grad_()
        return seen["h"]

    handle = dict(teacher.named_modules())[tap].register_forward_hook(keep)
    with torch.enable_grad():
        log_p = F.log_softmax(teacher(**inputs), -1).gather(-1, target[..., None]).sum()
        (grad,) = torch.autograd.grad(log_p, seen["h"])
    handle.remove()
    return seen["h"].detach(), grad


def update_once(fisher: dict, teacher, inputs, target, tap: str | None = None) -> FisherWeighter:
    spec = FisherSpec(**fisher, every=1, fraction=1.0)
    names = [n for n, _ in teacher.named_parameters()]
    weighter = FisherWeighter(spec, "test", tap=tap, parameter_names=names)
    weighter(FisherBatch(inputs, teacher, teacher(**inputs), target, mask=inputs["attention_mask"]))
    return weighter


def test_class_statistic_of_per_token_logits_averages_over_valid_tokens_only():
    teacher, inputs, target, singles = padded_batch()
    weighter = update_once({"axis": "class"}, teacher, inputs, target)
    probs = torch.cat([F.softmax(teacher(**x)[0], -1) for x, _ in singles])  # the 10 valid tokens
    assert torch.allclose(weighter.statistic.read(), (probs * (1 - probs)).mean(0), atol=1e-6)


@pytest.mark.parametrize("pool", [False, True], ids=["per-token-logits", "pooled-logits"])
def test_channel_statistic_averages_the_valid_tokens_of_each_sequence(pool):
    teacher, inputs, target, singles = padded_batch(pool)
    weighter = update_once({"axis": "channel", "estimator": "empirical"}, teacher, inputs, target, tap="block")
    per_sequence = [scores_by_hand(teacher, x, y, "block")[1].pow(2).mean(1) for x, y in singles]  # [1, D] each
    assert torch.allclose(weighter.statistic.read(), torch.cat(per_sequence).mean(0), rtol=1e-4, atol=1e-7)


def test_head_statistic_sums_over_valid_tokens_only():
    teacher, inputs, target, singles = padded_batch()
    weighter = update_once({"axis": "head", "estimator": "empirical"}, teacher, inputs, target, tap="probs")
    gates = [(h * g).sum((2, 3)).pow(2) for h, g in (scores_by_hand(teacher, x, y, "probs") for x, y in singles)]
    assert torch.allclose(weighter.statistic.read(), torch.cat(gates).mean(0), rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("axis", ["token", "position"])
def test_token_and_position_weights_of_a_padded_sequence_are_those_of_the_sequence_alone(axis):
    teacher, inputs, target, singles = padded_batch()
    padded = update_once({"axis": axis, "estimator": "empirical"}, teacher, inputs, target, tap="block").last_weights
    for i, (x, y) in enumerate(singles):
        alone = update_once({"axis": axis, "estimator": "empirical"}, teacher, x, y, tap="block").last_weights
        assert torch.allclose(padded[i, : LENGTHS[i]], alone[0], rtol=1e-4, atol=1e-6)
    assert torch.equal(padded[1, 4:], torch.ones(2))  # pads get weight 1 (they are masked out of every loss)


def test_token_weights_from_attention_maps_ignore_padded_queries_and_keys():
    teacher, inputs, target, singles = padded_batch()
    padded = update_once({"axis": "token", "estimator": "empirical"}, teacher, inputs, target, tap="probs").last_weights
    alone = update_once({"axis": "token", "estimator": "empirical"}, teacher, *singles[1], tap="probs").last_weights
    assert torch.allclose(padded[1, :4], alone[0], rtol=1e-4, atol=1e-6)


def test_parameter_fisher_uses_the_valid_tokens_only(monkeypatch):
    teacher, inputs, target, singles = padded_batch()
    # deterministic "sampled" labels (the teacher's argmax), so a padded and an unpadded pass draw the same ŷ
    monkeypatch.setattr(E, "sample_labels", lambda logits, *args, **kwargs: logits.argmax(-1))
    names = ["head.weight", "proj.weight"]
    got = E.parameter_fisher(teacher, inputs, names, mask=inputs["attention_mask"])
    # by hand: (Σ over the 10 valid tokens of ∂ log p(ŷ)/∂θ)² / 10
    params = dict(teacher.named_parameters())
    total = [torch.zeros_like(params[n]) for n in names]
    for x, _ in singles:
        own = {n: p.detach().clone().requires_grad_(n in names) for n, p in params.items()}
        with torch.enable_grad():
            logits = torch.func.functional_call(teacher, own, (), x)
            log_p = F.log_softmax(logits, -1).gather(-1, logits.argmax(-1, keepdim=True)).sum()
            grads = torch.autograd.grad(log_p, [own[n] for n in names])
        total = [t + g for t, g in zip(total, grads)]
    for value, expected in zip(got, total):
        assert torch.allclose(value, expected.pow(2) / sum(LENGTHS), rtol=1e-4, atol=1e-9)


def test_ignored_labels_of_the_empirical_fisher_are_left_out():
    teacher, inputs, target, singles = padded_batch()
    ignored = target.clone()
    ignored[1, 4:] = -100  # the Transformers convention at pads
    ((_, grad),) = E.tapped_gradients(teacher, inputs, ["block"], target=ignored)
    ((_, expected),) = E.tapped_gradients(teacher, inputs, ["block"], target=target, mask=inputs["attention_mask"])
    assert torch.allclose(grad, expected)


def test_the_masked_estimates_read_nothing_on_the_host(monkeypatch):
    teacher, inputs, target, _ = padded_batch()

    forbid_host_reads(monkeypatch, "the Fisher estimate")
    for fisher, tap in [({"axis": "class"}, None), ({"axis": "channel"}, "block"), ({"axis": "head"}, "probs"),
                        ({"axis": "token"}, "probs"), ({"axis": "position"}, "block"), ({"axis": "parameter"}, None)]:
        weighter = update_once(fisher, teacher, inputs, target, tap=tap)
        assert weighter.last_weights is not None


def test_a_bf16_transformers_teacher_on_a_padded_batch_through_the_distiller():
    transformers = pytest.importorskip("transformers")
    from fisherkd.distiller import Distiller

    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    teacher = transformers.BertForSequenceClassification(config).eval()
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(1, 40, (4, 8), generator=g), torch.randint(0, 3, (4,), generator=g)
    mask = (torch.arange(8) < torch.tensor([8, 7, 6, 5])[:, None]).long()
    inputs = {"input_ids": ids * mask, "attention_mask": mask}
    tap = "bert.encoder.layer.1"
    fisher = {"axis": "channel", "estimator": "empirical", "every": 1, "fraction": 1.0}
    statistics = []
    for dtype in (torch.float32, BF16):  # the HF trainer's teacher_dtype casts the teacher like this
        torch.manual_seed(0)
        methods = [
            {"name": "fitnet", "pairs": [[tap, tap]], "fisher": fisher},
            {"name": "kd", "fisher": {"axis": "sample"}},
        ]
        distiller = Distiller(
            transformers.BertForSequenceClassification(config), copy.deepcopy(teacher).to(dtype), methods,
            example_input=inputs,
        )
        out = distiller(inputs, labels)
        out.loss.backward()
        assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in out.stats.values())
        statistics.append(distiller.fisher["fitnet"].statistic.read())
    close_in_bf16(statistics[1], statistics[0], rel=0.05)
