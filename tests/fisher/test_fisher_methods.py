"""Fisher weighting through the Distiller: γ = 0 / λ = 0 is the unweighted method bit for bit, every axis trains,
fisher_logit's defining properties, position weights against naive loops, config errors, and no host sync."""

import pytest
import torch
import torch.nn.functional as F

from fisherkd import functional as Fn
from fisherkd.config import ConfigError, build_config
from fisherkd.distiller import Distiller
from fisherkd.models import create_model
from helpers import TinyCNN, forbid_host_reads, tiny_image_batch

IMAGE_CASES = [
    ({"name": "kd"}, {"axis": "sample"}),
    ({"name": "fisher_logit"}, {"axis": "class"}),
    ({"name": "fitnet", "pairs": [["block2", "block2"]]}, {"axis": "channel"}),
    ({"name": "fitnet", "pairs": [["head:in", "head:in"]]}, {"axis": "channel", "estimator": "linear_head"}),
    ({"name": "at", "pairs": [["block1", "block1"]]}, {"axis": "position"}),
    ({"name": "vid", "pairs": [["block2", "block2"]]}, {"axis": "channel", "estimator": "empirical"}),
    ({"name": "pkt", "pairs": [["head:in", "head:in"]]}, {"axis": "sample", "estimator": "linear_head"}),
]


def losses(spec: dict, steps: int = 3) -> list[torch.Tensor]:
    """The method's terms over ``steps`` Adam steps (on CE + the method) of a TinyCNN pair on one batch."""
    torch.manual_seed(0)
    x, y = tiny_image_batch()
    distiller = Distiller(TinyCNN(4), TinyCNN(8), [{"name": "ce"}, {"weight": 1.0, **spec}], example_input=x[:2])
    optimizer = torch.optim.Adam(distiller.trainable_parameters(), lr=1e-2)
    out = []
    for _ in range(steps):
        result = distiller(x, y)
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        distiller.after_optimizer_step()
        out.append(torch.stack([v.detach() for k, v in result.losses.items() if k != "ce"]))
    return out


@pytest.mark.parametrize("method, fisher", IMAGE_CASES, ids=lambda c: c.get("name", c.get("axis")))
def test_gamma_or_lambda_zero_is_the_unweighted_method_bitwise_and_weights_change_it(method, fisher):
    plain = losses(method)
    for off in ({"gamma": 0.0}, {"lam": 0.0}):
        assert torch.equal(torch.stack(losses({**method, "fisher": {**fisher, **off}})), torch.stack(plain))
    weighted = losses({**method, "fisher": {**fisher, "every": 1}})
    assert torch.isfinite(torch.stack(weighted)).all()
    assert not torch.equal(torch.stack(weighted), torch.stack(plain))


def test_attention_heads_and_tokens_of_a_vit_are_weightable_and_gamma_zero_is_exact():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))

    def run(fisher: dict | None) -> torch.Tensor:
        torch.manual_seed(0)
        teacher = create_model("vit_tiny", 3, 5, dim=32, depth=1, heads=4)
        student = create_model("vit_tiny", 3, 5, dim=16, depth=1, heads=4)
        pair = [["blocks.0.attn.probs", "blocks.0.attn.probs"]]
        spec = {"name": "minilm", "pairs": pair, **({"fisher": fisher} if fisher else {})}
        distiller = Distiller(student, teacher, [spec], example_input=x[:2])
        out = distiller(x, y)
        out.loss.backward()
        return out.loss.detach()

    plain = run(None)
    assert torch.equal(run({"axis": "head", "gamma": 0.0}), plain)
    assert not torch.equal(run({"axis": "head"}), plain)
    assert not torch.equal(run({"axis": "token", "estimator": "empirical", "tap": "blocks.0"}), plain)  # B×T×D
    assert not torch.equal(run({"axis": "token"}), plain)  # per query, from the attention probabilities


def test_lambda_warmup_starts_unweighted():
    plain = losses({"name": "kd"}, steps=1)
    assert torch.equal(losses({"name": "kd", "fisher": {"axis": "sample", "warmup_steps": 10}}, steps=1)[0], plain[0])


def test_fisher_logit_is_shift_invariant_with_gradient_f_times_d_and_the_quadratic_form_of_kd():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g) * 2
    for tau in (1.0, 4.0):
        value = Fn.fisher_logit(s, t, tau)
        assert torch.allclose(Fn.fisher_logit(s + 3.7, t, tau), value, atol=1e-5)
        assert torch.allclose(Fn.fisher_logit(s + torch.randn(6, 1, generator=g), t, tau), value, atol=1e-5)
        z = s.clone().requires_grad_()
        Fn.fisher_logit(z, t, tau).backward()
        p = F.softmax(t / tau, -1)
        fisher = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # F = diag(p) − ppᵀ per sample
        expected = (fisher @ (s - t)[:, :, None]).squeeze(-1) / len(s)  # ∂/∂z_s of the batch mean
        assert torch.allclose(z.grad, expected, atol=1e-6)
        small = t + 1e-2 * torch.randn(6, 5, generator=g)  # second order: agrees with τ²·KL up to O(d³)
        assert Fn.fisher_logit(small, t, tau).item() == pytest.approx(Fn.kd(small, t, tau).item(), rel=2e-2)
    weights = torch.rand(6, generator=g) + 0.5
    per_sample = torch.stack([Fn.fisher_logit(s[i : i + 1], t[i : i + 1]) for i in range(6)])
    assert torch.allclose(Fn.fisher_logit(s, t, sample_weight=weights), (weights * per_sample).mean())
    assert torch.equal(Fn.fisher_logit(s, t, class_weight=torch.ones(5)), Fn.fisher_logit(s, t))


def naive_weighted_fitnet(s, t, channel, position):
    b_, c_, h_, w_ = s.shape
    total = 0.0
    for b in range(b_):
        acc = 0.0
        for c in range(c_):
            for i in range(h_):
                for j in range(w_):
                    acc += channel[c] * position[b, i, j] * (s[b, c, i, j] - t[b, c, i, j]) ** 2
        total += acc / (c_ * h_ * w_)
    return total / b_


def test_position_weights_of_fitnet_and_at_against_naive_loops():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, 3, generator=g), torch.randn(2, 3, 4, 3, generator=g)
    channel, position = torch.rand(3, generator=g) + 0.5, torch.rand(2, 4, 3, generator=g) + 0.5
    value = Fn.fitnet(s, t, channel_weight=channel, position_weight=position)
    assert value.item() == pytest.approx(float(naive_weighted_fitnet(s, t, channel, position)), rel=1e-5)
    assert torch.equal(Fn.fitnet(s, t, position_weight=torch.ones(2, 4, 3)), Fn.fitnet(s, t))
    q_s = F.normalize(s.pow(2).mean(1).flatten(1), dim=1)
    q_t = F.normalize(t.pow(2).mean(1).flatten(1), dim=1)
    expected = sum(
        position[b].flatten()[k] * (q_s[b, k] - q_t[b, k]) ** 2 for b in range(2) for k in range(12)
    ) / 24
    assert Fn.at(s, t, position_weight=position).item() == pytest.approx(float(expected), rel=1e-5)
    assert torch.equal(Fn.at(s, t, position_weight=torch.ones(2, 4, 3)), Fn.at(s, t))
    with pytest.raises(ValueError, match="position weights"):
        Fn.fitnet(s, t, position_weight=torch.ones(2, 12))


def test_fisher_param_pulls_matching_parameters_to_the_teacher_weighted_by_its_fisher():
    torch.manual_seed(0)
    x, y = tiny_image_batch()
    teacher, student = TinyCNN(4), TinyCNN(4)
    distiller = Distiller(student, teacher, [{"name": "fisher_param", "fisher": {"axis": "parameter", "gamma": 0.0}}])
    plain = 0.5 * sum((ps - pt).pow(2).sum() for ps, pt in zip(student.parameters(), teacher.parameters()))
    assert torch.allclose(distiller(x, y).loss, plain)
    weighted = Distiller(student, teacher, ["fisher_param"])  # the default block: parameter axis, γ = 1
    optimizer = torch.optim.SGD(weighted.trainable_parameters(), lr=0.05)  # curvature ≤ 10
    first = weighted(x, y).loss
    for _ in range(5):
        out = weighted(x, y)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        weighted.after_optimizer_step()
    assert out.loss < first and weighted.fisher["fisher_param"].statistic.value.numel() == sum(
        p.numel() for p in teacher.parameters()
    )


def base_config(method: dict) -> dict:
    return {"teacher": {"name": "cnn1d"}, "student": {"name": "mlp"}, "methods": [{"name": "ce"}, method]}


def test_config_errors_name_the_key_path_and_the_supported_axes():
    with pytest.raises(ConfigError, match=r"methods\.1: method 'kd' cannot be Fisher-weighted along 'channel'.*sample"):
        build_config(base_config({"name": "kd", "fisher": {"axis": "channel"}}))
    with pytest.raises(ConfigError, match=r"methods\.1: method 'dist' cannot be Fisher-weighted.*none"):
        build_config(base_config({"name": "dist", "fisher": {"axis": "sample"}}))
    with pytest.raises(ConfigError, match=r"methods\.1\.fisher.*unknown key 'gama'.*gamma"):
        build_config(base_config({"name": "kd", "fisher": {"axis": "sample", "gama": 1}}))
    with pytest.raises(ConfigError, match=r"methods\.1\.fisher.*'sample' takes the estimators logit, linear_head"):
        build_config(base_config({"name": "kd", "fisher": {"axis": "sample", "estimator": "sampled"}}))
    config = build_config(base_config({"name": "fitnet", "pairs": [["features", "features"]],
                                       "fisher": {"axis": "channel", "gamma": 0.5}}))
    assert config.methods[1].fisher.gamma == 0.5 and config.methods[1].hparams == {}


def test_the_weighted_step_reads_nothing_on_the_host(monkeypatch):
    torch.manual_seed(0)
    x, y = tiny_image_batch()
    specs = [{"name": spec["name"], "pairs": spec.get("pairs", []), "fisher": {**fisher, "every": 1}}
             for spec, fisher in IMAGE_CASES]
    distiller = Distiller(TinyCNN(4), TinyCNN(8), specs, example_input=x[:2])

    forbid_host_reads(monkeypatch)
    for _ in range(2):
        out = distiller(x, y)
        out.loss.backward()
        distiller.after_optimizer_step()
    monkeypatch.undo()
    count = sum(3 if fisher["axis"] == "sample" else 2 for _, fisher in IMAGE_CASES)  # sample weights: + ess
    assert len(out.stats) == count and all(v.dim() == 0 for v in out.stats.values())


def test_token_weights_from_per_token_logits_have_mean_one_over_each_sequence_valid_tokens():
    from fisherkd.fisher import FisherBatch, FisherSpec, FisherWeighter

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g) * 3
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    weighter = FisherWeighter(FisherSpec(axis="token", estimator="logit"), "lm")
    weights, stats = weighter(FisherBatch(torch.zeros(3, 7), torch.nn.Identity(), logits, mask=mask))
    assert weights.shape == (3, 7) and set(stats) == {"entropy", "max_min"}
    for b in range(3):
        assert weights[b][mask[b].bool()].mean().item() == pytest.approx(1.0, abs=1e-5)
    trace = 1 - F.softmax(logits, -1).pow(2).sum(-1)  # the per-token Fisher trace orders the weights
    valid = mask[0].bool()
    assert torch.equal(weights[0][valid].argsort(), trace[0][valid].argsort())
