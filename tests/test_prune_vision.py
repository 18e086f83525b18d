"""Structured pruning of zoo teachers (fisherkd.prune): importance criteria against naive statements, pruned
models against the teacher with the pruned units zeroed, and the ``student: {from_teacher: ...}`` config path."""

import copy

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from fisherkd.config import ConfigError, build_config, load_run_config
from fisherkd.data import ArrayDataset, DataSplits
from fisherkd.models import create_model
from fisherkd.models.saved import load_student, save_student, student_spec
from fisherkd.prune import Gate, Structure, importance, prune, structures_of
from fisherkd.run import rebuild_distiller, train

WIDTH_IMPORTANCES = ["fisher", "empirical", "activation", "weight"]


def batch(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 40, generator=g), torch.randint(0, 10, (n,), generator=g)


def one_live_unit(name: str, live: int) -> nn.Module:
    """A zoo model where only unit ``live`` of every layer has weights: every other unit is zero everywhere."""
    torch.manual_seed(0)
    model = create_model(name, 1, 10, **({"hidden": (6, 6)} if name == "mlp" else {"channels": 5})).eval()
    with torch.no_grad():
        for s in structures_of(model):
            for sl in s.slices:
                tensor = model.state_dict()[sl.tensor]
                dead = torch.ones(s.size, dtype=torch.bool)
                dead[live] = False
                tensor.movedim(sl.dim, 0).unflatten(0, (s.size, sl.width))[dead] = 0.0
            # the live unit must pass its ReLU on most inputs
            model.get_parameter(f"{s.name}.bias")[live] = 3.0
    return model


@pytest.mark.parametrize("name", ["mlp", "cnn1d"])
@pytest.mark.parametrize("method", WIDTH_IMPORTANCES)
def test_every_importance_but_random_keeps_the_only_unit_that_matters(name, method):
    model = one_live_unit(name, live=2)
    pruned = prune(model, [batch()], width=0.01, importance_method=method, name=name)
    assert {k: v.tolist() for k, v in pruned.keep.items()} == {s.name: [2] for s in structures_of(model)}
    x, _ = batch(seed=1)
    with torch.no_grad():  # nothing else mattered, so nothing is lost
        torch.testing.assert_close(pruned.model(x), model(x))


def test_random_importance_is_seeded():
    model = create_model("mlp", 1, 10)
    first = prune(model, [batch()], importance_method="random", name="mlp", seed=3).keep
    again = prune(model, [batch()], importance_method="random", name="mlp", seed=3).keep
    other = prune(model, [batch()], importance_method="random", name="mlp", seed=4).keep
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def zero_pruned_rows(model: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
    """The teacher with every pruned unit's producing weights (its row and bias) zeroed: its ReLU then gives 0, which
    is what a gate at zero does. Written apart from the library's gates and slicing."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for name, kept in keep.items():
            layer = masked.get_submodule(name)
            dead = torch.ones(layer.weight.shape[0], dtype=torch.bool)
            dead[kept] = False
            layer.weight[dead] = 0.0
            layer.bias[dead] = 0.0
    return masked


@pytest.mark.parametrize("name", ["mlp", "cnn1d"])
def test_pruned_model_equals_the_teacher_with_pruned_units_zeroed_and_saves_like_any_student(name, tmp_path):
    torch.manual_seed(0)
    teacher = create_model(name, 1, 10).eval()
    pruned = prune(teacher, [batch()], width=0.3, importance_method="fisher", name=name, in_channels=1)
    expected = {"mlp": {"hidden": [30, 30]}, "cnn1d": {"channels": 8}}[name]
    assert pruned.kwargs == expected
    assert sum(p.numel() for p in pruned.model.parameters()) < sum(p.numel() for p in teacher.parameters()) / 2
    x, _ = batch(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(pruned.model(x), zero_pruned_rows(teacher, pruned.keep)(x), rtol=1e-5, atol=1e-6)
    save_student(pruned.model, student_spec(pruned.model, name, 1, 10, pruned.kwargs), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(load_student(tmp_path)(x), pruned.model(x))


# resnet20's blocks with an identity shortcut (the first of stages 2 and 3 project, so they stay)
RESNET20_REMOVABLE = ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer3.2"]


@pytest.mark.parametrize("layer_importance", ["block", "activation"])
def test_pruned_resnet_equals_the_teacher_with_pruned_channels_zeroed_and_removed_blocks_skipped(
    layer_importance, tmp_path
):
    torch.manual_seed(0)
    teacher = create_model("resnet20", 3, 10).eval()
    with torch.no_grad():  # BatchNorm statistics and affine maps that are not the identity
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.bias.uniform_(-0.2, 0.2)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    pruned = prune(teacher, [(x, y)], width=0.5, layers=5, layer_importance=layer_importance, name="resnet20")
    removed = [b for i, b in enumerate(RESNET20_REMOVABLE) if i not in pruned.keep["blocks"].tolist()]
    assert len(removed) == 4
    kept = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3) if f"layer{s}.{b}" not in removed]
    counts = [sum(k.startswith(f"layer{s}.") for k in kept) for s in (1, 2, 3)]
    assert pruned.kwargs == {
        "inner": [8 if k.startswith("layer1") else 16 if k.startswith("layer2") else 32 for k in kept],
        "blocks": counts,
    }
    masked = copy.deepcopy(teacher)
    with torch.no_grad():  # a channel whose BatchNorm scale and shift are 0 is 0 after its ReLU
        for name, kept_units in pruned.keep.items():
            if name == "blocks":
                continue
            bn = masked.get_submodule(f"{name}.1")
            dead = torch.ones(bn.num_features, dtype=torch.bool)
            dead[kept_units] = False
            bn.weight[dead], bn.bias[dead] = 0.0, 0.0
        for block in removed:
            stage, index = block.split(".")
            masked.get_submodule(stage)[int(index)] = nn.Identity()
        x = torch.randn(2, 3, 8, 8)
        torch.testing.assert_close(pruned.model(x), masked(x), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in pruned.model.parameters()) < sum(p.numel() for p in teacher.parameters()) / 2
    save_student(pruned.model, student_spec(pruned.model, "resnet20", 3, 10, pruned.kwargs), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(load_student(tmp_path)(x), pruned.model(x))


def test_activation_and_weight_importance_match_a_naive_loop():
    torch.manual_seed(0)
    model = create_model("mlp", 1, 10, hidden=(5, 4)).eval()
    x, y = batch(7)
    first, second, head = model.features[1], model.features[3], model.head
    act = importance(model, structures_of(model), [(x[:3], y[:3]), (x[3:], y[3:])], "activation")
    weight = importance(model, structures_of(model), [(x, y)], "weight")
    torch.set_grad_enabled(False)
    for j in range(5):
        total = 0.0
        for n in range(7):
            total += abs(max(0.0, float(first.weight[j] @ x[n] + first.bias[j])))
        assert act["features.1"][j].item() == pytest.approx(total / 7, rel=1e-5)
        squares = sum(float(w) ** 2 for w in first.weight[j]) + float(first.bias[j]) ** 2
        squares += sum(float(second.weight[i, j]) ** 2 for i in range(4))
        assert weight["features.1"][j].item() == pytest.approx(squares**0.5, rel=1e-5)
    for j in range(4):
        squares = sum(float(w) ** 2 for w in second.weight[j]) + float(second.bias[j]) ** 2
        squares += sum(float(head.weight[i, j]) ** 2 for i in range(10))
        assert weight["features.3"][j].item() == pytest.approx(squares**0.5, rel=1e-5)
    torch.set_grad_enabled(True)


def test_cnn_activation_importance_is_the_mean_absolute_channel_over_positions():
    torch.manual_seed(0)
    model = create_model("cnn1d", 1, 10, channels=3).eval()
    x, y = batch(4)
    act = importance(model, structures_of(model), [(x, y)], "activation")
    with torch.no_grad():
        h = model.features[1](model.features[0](x.unsqueeze(1))).clone()  # B × C × L after the first ReLU
    for c in range(3):
        naive = sum(abs(float(v)) for n in range(4) for v in h[n, c]) / (4 * h.shape[2])
        assert act["features.0"][c].item() == pytest.approx(naive, rel=1e-5)


def gate_gradients_squared(model: nn.Module, x, labels, gated: int, channel_axis: bool) -> torch.Tensor:
    """E_n[(∂ log p(label_n|x_n)/∂ξ)²] with an explicit gate ξ = ones after ``model.features[gated]``, one sample at
    a time."""
    total = 0.0
    for n in range(len(x)):
        gate = torch.ones(model.features[gated - 1].weight.shape[0], requires_grad=True)
        h = x[n : n + 1].unsqueeze(1) if channel_axis else x[n : n + 1]
        for i, layer in enumerate(model.features):
            h = layer(h)
            if i == gated:
                h = h * (gate[None, :, None] if channel_axis else gate[None, :])
        log_p = F.log_softmax(model.head(h), -1)[0, labels[n]]
        (grad,) = torch.autograd.grad(log_p, gate)
        total = total + grad.pow(2)
    return total / len(x)


@pytest.mark.parametrize("name", ["mlp", "cnn1d"])
def test_fisher_of_gates_equals_the_squared_gradient_of_an_explicit_gate(name, monkeypatch):
    torch.manual_seed(0)
    model = create_model(name, 1, 10, **({"hidden": (6, 5)} if name == "mlp" else {"channels": 8})).eval()
    x, y = batch(5)
    gated = 4 if name == "mlp" else 3  # the second hidden layer's ReLU
    structure = next(s for s in structures_of(model) if s.gates[0].module == f"features.{gated}")
    expected = gate_gradients_squared(model, x, y, gated, name == "cnn1d")
    assert (expected > 1e-6).sum() >= 2  # live gates, so a wrong reduction over samples cannot pass
    empirical = importance(model, [structure], [(x[:2], y[:2]), (x[2:], y[2:])], "empirical")[structure.name]
    torch.testing.assert_close(empirical, expected, rtol=1e-4, atol=1e-7)
    # the true Fisher differs only in where the labels come from: fix the draw and it is the same gradient
    sampled = (y + 3) % 10
    monkeypatch.setattr("fisherkd.prune.criteria.sample_labels", lambda logits, *a, **k: sampled[: len(logits)])
    fisher = importance(model, [structure], [(x, y)], "fisher")[structure.name]
    torch.testing.assert_close(
        fisher, gate_gradients_squared(model, x, sampled, gated, name == "cnn1d"), rtol=1e-4, atol=1e-7
    )


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.linear(x))


class ResidualNet(nn.Module):
    def __init__(self, width: int = 6, depth: int = 3, num_classes: int = 4) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Residual(width) for _ in range(depth)))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def blocks_structure(depth: int = 3) -> Structure:
    return Structure("blocks", "layer", depth, tuple(Gate(f"blocks.{i}", 1, 1, "delta") for i in range(depth)))


def test_block_importance_and_removal_loss_match_a_hand_computation():
    torch.manual_seed(0)
    model = ResidualNet().eval()
    x = torch.randn(5, 6)
    y = torch.randint(0, 4, (5,))
    block = importance(model, [blocks_structure()], [(x, y)], "block")["blocks"]
    removal = importance(model, [blocks_structure()], [(x, y)], "removal")["blocks"]
    with torch.no_grad():
        h, full = x, F.cross_entropy(model(x), y)
        for i, layer in enumerate(model.blocks):
            out = layer(h)
            cos = (h * out).sum(1) / (h.norm(dim=1) * out.norm(dim=1))
            assert block[i].item() == pytest.approx((1 - cos).mean().item(), rel=1e-5)
            skipped = x
            for j, other in enumerate(model.blocks):
                skipped = skipped if j == i else other(skipped)
            assert removal[i].item() == pytest.approx((F.cross_entropy(model.head(skipped), y) - full).item(), abs=1e-6)
            h = out


def test_weight_and_activation_importance_of_blocks_match_a_hand_computation():
    torch.manual_seed(0)
    model = ResidualNet().eval()
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    weight = importance(model, [blocks_structure()], [(x, y)], "weight")["blocks"]
    activation = importance(model, [blocks_structure()], [(x[:2], y[:2]), (x[2:], y[2:])], "activation")["blocks"]
    with torch.no_grad():
        h = x
        for i, block in enumerate(model.blocks):
            norm = (block.linear.weight.pow(2).sum() + block.linear.bias.pow(2).sum()).sqrt()
            assert weight[i].item() == pytest.approx(norm.item(), rel=1e-5)
            update = block(h) - h  # a block's activation is the size of what it adds to its input
            assert activation[i].item() == pytest.approx(update.norm(dim=1).mean().item(), rel=1e-5)
            h = block(h)


def test_fisher_of_a_block_gate_equals_the_squared_gradient_of_out_equals_in_plus_gate_times_update():
    torch.manual_seed(0)
    model = ResidualNet().eval()
    x, y = torch.randn(4, 6), torch.randint(0, 4, (4,))
    fisher = importance(model, [blocks_structure()], [(x, y)], "empirical")["blocks"]
    expected = torch.zeros(3)
    for n in range(4):
        gates = torch.ones(3, requires_grad=True)
        h = x[n : n + 1]
        for i, layer in enumerate(model.blocks):
            h = h + gates[i] * (layer(h) - h)
        (grad,) = torch.autograd.grad(F.log_softmax(model.head(h), -1)[0, y[n]], gates)
        expected += grad.pow(2) / 4
    torch.testing.assert_close(fisher, expected, rtol=1e-4, atol=1e-8)


def test_bad_pruning_requests_are_refused_in_one_line():
    with pytest.raises(ValueError, match="unknown importance 'fishr'.*fisher"):
        prune(create_model("mlp", 1, 10), [batch()], importance_method="fishr", name="mlp")
    with pytest.raises(ValueError, match="has no removable blocks; leave layers out"):
        prune(create_model("cnn1d", 1, 10), [batch()], layers=2, name="cnn1d")
    with pytest.raises(ValueError, match=r"width=0: the kept fraction of each width must be in \(0, 1\]"):
        prune(create_model("cnn1d", 1, 10), [batch()], width=0, name="cnn1d")
    with pytest.raises(ValueError, match="needs its zoo name"):
        prune(create_model("cnn1d", 1, 10), [batch()])


def toy_splits(n: int = 64) -> DataSplits:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + 16, 40, generator=g)
    y = (x[:, :10].sum(1) > 0).long() + 2 * (x[:, 10:20].sum(1) > 0).long()
    return DataSplits("toy", ArrayDataset(x[:n], y[:n]), ArrayDataset(x[n:], y[n:]), 4, (40,))


def test_config_from_teacher_prunes_the_runs_teacher_and_the_run_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("fisherkd.plots.plot_run", lambda *args, **kwargs: None)  # plots are not under test here
    raw = {
        "name": "pruned",
        "output_dir": str(tmp_path / "runs"),
        "teacher": {"name": "cnn1d", "train": {"epochs": 1, "batch_size": 32}},
        "student": {"from_teacher": {"width": 0.5, "importance": "fisher", "calibration": 40}},
        "methods": [{"name": "kd"}],
        "train": {"epochs": 1, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.01}},
    }
    config = build_config(raw)
    splits = toy_splits()
    summary = train(config, run_dir=tmp_path / "run", splits=splits)
    resolved = load_run_config(tmp_path / "run")
    assert (resolved.student.name, resolved.student.kwargs, resolved.student.from_teacher) == (
        "cnn1d",
        {"channels": 12},
        None,
    )
    record = yaml.safe_load((tmp_path / "run" / "pruning.json").read_text())
    assert record["from_teacher"]["width"] == 0.5 and record["kwargs"] == {"channels": 12}
    assert record["from_teacher"]["seed"] == config.seed == 0  # no seed given: the run's seed calibrates
    reseeded = build_config({**raw, "seed": 5})
    train(reseeded, run_dir=tmp_path / "run5", splits=splits)
    assert yaml.safe_load((tmp_path / "run5" / "pruning.json").read_text())["from_teacher"]["seed"] == 5
    distiller = rebuild_distiller(tmp_path / "run", resolved, splits)  # a strict load of the pruned student
    assert distiller.student.features[0].out_channels == 12
    assert 0.0 <= summary["test_accuracy"] <= 1.0


def test_from_teacher_config_errors_are_one_line():
    base = {"student": {"from_teacher": {"width": 0.5}}, "methods": [{"name": "ce"}]}
    with pytest.raises(ConfigError, match="from_teacher prunes the teacher: add a teacher"):
        build_config(base)
    with pytest.raises(ConfigError, match="a student pruned from the teacher is a 'cnn1d'"):
        build_config({**base, "teacher": {"name": "cnn1d"}, "student": {"name": "mlp", "from_teacher": {}}})
    with pytest.raises(ConfigError, match="student needs a zoo name"):
        build_config({"student": {}, "methods": [{"name": "ce"}]})
