"""The ``direction`` axis (DESIGN.md §4b, issue #12 item 2): the C×C Fisher statistic against naive loops and the
head's closed form, the metric against its definition, a head that reads 2 of 8 channels, FitNet's quadratic form
against a naive loop, training end to end, checkpoints, DDP, config errors and no host sync."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from fisherkd import functional as Fn
from fisherkd.config import ConfigError, build_config
from fisherkd.distiller import Distiller
from fisherkd.engine.checkpoint import load_checkpoint, save_atomic
from fisherkd.fisher import FisherBatch, FisherSpec, FisherWeighter
from fisherkd.fisher import estimators as E
from fisherkd.fisher.metric import fisher_metric, head_space_metric
from helpers import TinyCNN, assert_trains, forbid_host_reads, tiny_image_batch


def naive_direction(grad: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean over samples of the mean over (valid) positions of g gᵀ, one outer product at a time."""
    channels = grad.shape[-1] if grad.dim() == 3 else grad.shape[1]
    total = torch.zeros(channels, channels, dtype=torch.float64)
    for b in range(grad.shape[0]):
        if grad.dim() == 3:  # B×T×D tokens
            vectors = [grad[b, t] for t in range(grad.shape[1]) if mask is None or mask[b, t]]
        elif grad.dim() == 2:
            vectors = [grad[b]]
        else:  # B×C×H×W
            vectors = [grad[b, :, i, j] for i in range(grad.shape[2]) for j in range(grad.shape[3])]
        total += sum(torch.outer(v, v).double() for v in vectors) / len(vectors)
    return (total / grad.shape[0]).float()


def test_direction_statistic_is_the_mean_outer_product_of_the_scores():
    torch.manual_seed(0)
    teacher = TinyCNN(width=4).eval().requires_grad_(False)
    x, _ = tiny_image_batch(6)
    ((_, grad),) = E.tapped_gradients(teacher, x, ["block1"], generator=torch.Generator().manual_seed(0))
    assert grad.shape == (6, 4, 8, 8)
    statistic = E.direction_fisher(grad)
    assert torch.allclose(statistic, naive_direction(grad), rtol=1e-5, atol=1e-9)
    # its diagonal is the channel axis's statistic
    assert torch.allclose(statistic.diagonal(), E.channel_fisher(grad.pow(2)).mean(0), rtol=1e-5, atol=1e-9)
    vector = torch.randn(5, 3)
    assert torch.allclose(E.direction_fisher(vector), naive_direction(vector), rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the statistic stays float32 inside a bf16 step
        assert torch.allclose(E.direction_fisher(grad), statistic, rtol=1e-6, atol=0)
    tokens, mask = torch.randn(3, 6, 4), torch.ones(3, 6, dtype=torch.long)
    mask[1, 2:] = 0
    tokens[1, 2:] = 100.0  # padding must not leak in
    assert torch.allclose(E.direction_fisher(tokens, mask), naive_direction(tokens, mask), rtol=1e-5)


def test_linear_head_closed_form_is_the_exact_mean_and_the_expected_sampled_outer_product():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).requires_grad_(False)
    w = teacher[2].weight
    x = torch.randn(3, 6)
    for tau in (1.0, 2.0):
        logits = teacher(x)
        closed = E.linear_head_direction_fisher(logits, w, tau)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.allclose(E.linear_head_direction_fisher(logits, w, tau), closed, rtol=1e-6)
        p = F.softmax(teacher(x) / tau, -1)
        exact = sum(w.T @ (torch.diag(p[n]) - torch.outer(p[n], p[n])) @ w for n in range(3)) / 3
        assert torch.allclose(closed, exact, rtol=1e-5, atol=1e-7)
        # Monte Carlo: E_ŷ[g gᵀ] at the head's input is the closed form (the score of softmax(z/τ) carries 1/τ)
        draws = x.repeat(4000, 1)
        ((_, grad),) = E.tapped_gradients(teacher, draws, ["2:in"], temperature=tau,
                                          generator=torch.Generator().manual_seed(1))
        outer = (grad[:, :, None] * grad[:, None, :]).reshape(4000, 3, -1) * tau**2
        mean, se = outer.mean(0).mean(0), outer.mean(1).std(0) / 4000**0.5
        assert ((mean - closed.flatten()).abs() <= 5 * se + 1e-6).all()
    # per-token logits: each sample's valid tokens first, as the sampled form does
    logits, mask = torch.randn(2, 5, 4) * 2, torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    p = F.softmax(logits, -1)
    per_sample = [
        sum(w.T @ (torch.diag(p[b, t]) - torch.outer(p[b, t], p[b, t])) @ w for t in range(5) if mask[b, t])
        / mask[b].sum()
        for b in range(2)
    ]
    assert torch.allclose(E.linear_head_direction_fisher(logits, w, 1.0, mask), sum(per_sample) / 2, atol=1e-6)


def random_basis(size: int, seed: int = 0) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(size, size, generator=torch.Generator().manual_seed(seed)))[0]


def test_metric_keeps_the_top_directions_with_the_energy_and_pins_the_rest():
    u = random_basis(6)
    spectrum = torch.tensor([6.0, 3.0, 0.6, 0.3, 0.1, 0.0])  # trace 10: 90% in 2, 96% in 3 directions
    statistic = u @ torch.diag(spectrum) @ u.T
    eye = torch.eye(6) / 6
    top = u[:, :3]
    metric, k = fisher_metric(statistic, energy=0.95, isotropic=0.1)
    expected = top @ torch.diag(spectrum[:3]) @ top.T / 9.6 + 0.1 * eye
    assert k.item() == 3 and torch.allclose(metric, expected, atol=1e-6)
    assert metric.trace().item() == pytest.approx(1.1, abs=1e-6)
    assert torch.linalg.eigvalsh(metric).min() >= 0.1 / 6 - 1e-6  # PSD, the isotropic part pins every direction
    metric, k = fisher_metric(statistic, energy=0.95, rank=2, gamma=0.5, isotropic=0.0)
    root = spectrum[:2].sqrt()
    assert k.item() == 2 and torch.allclose(metric, u[:, :2] @ torch.diag(root / root.sum()) @ u[:, :2].T, atol=1e-6)
    complement, k = fisher_metric(statistic, "complement", energy=0.95, isotropic=0.1, lam=0.5)
    projector = (torch.eye(6) - top @ top.T) / 3
    assert k.item() == 3 and torch.allclose(complement, 0.5 * eye + 0.5 * (projector + 0.1 * eye), atol=1e-6)
    # λ = 0 is the isotropic metric; a flat spectrum keeps every direction but the complement keeps one
    assert torch.allclose(fisher_metric(statistic, lam=0.0)[0], eye)
    assert fisher_metric(torch.eye(6), energy=1.0)[1].item() == 6
    assert fisher_metric(torch.eye(6), "complement", energy=1.0)[1].item() == 5


def test_the_lambda_warm_up_mixes_with_the_isotropic_metric_without_a_new_eigen_decomposition(monkeypatch):
    teacher = two_channel_teacher()
    x = torch.randn(8, 6)
    spec = FisherSpec(axis="direction", warmup_steps=4, every=100, fraction=1.0)
    weighter = FisherWeighter(spec, "test", tap="2:in")
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a: calls.append(1) or eigh(a))
    metrics = []
    for _ in range(4):  # λ = 0, 1/4, 1/2, 3/4; one update of the statistic, at step 0
        metrics.append(weighter(FisherBatch(x, teacher, teacher(x), feature=teacher[:2](x)))[0])
        weighter.after_optimizer_step()
    assert len(calls) == 1 and weighter.statistic.updates == 1
    full, _ = fisher_metric(weighter.statistic.read())
    eye = torch.eye(8) / 8
    assert torch.allclose(metrics[0], eye) and torch.allclose(metrics[2], 0.5 * eye + 0.5 * full, atol=1e-7)


def two_channel_teacher() -> nn.Module:
    """An MLP whose head reads hidden channels 2 and 5 only (of 8)."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    with torch.no_grad():
        teacher[2].weight[:, [0, 1, 3, 4, 6, 7]] = 0.0
    return teacher.requires_grad_(False)


def test_a_head_reading_two_channels_gives_a_metric_on_those_channels_and_a_null_space_orthogonal_to_them():
    teacher = two_channel_teacher()
    x = torch.randn(64, 6)
    others = [0, 1, 3, 4, 6, 7]
    ((_, grad),) = E.tapped_gradients(teacher, x, ["2:in"], generator=torch.Generator().manual_seed(0))
    for statistic in (E.direction_fisher(grad), E.linear_head_direction_fisher(teacher(x), teacher[2].weight)):
        metric, k = fisher_metric(statistic, energy=1.0, isotropic=0.0)
        assert metric[others].abs().max() < 1e-6 and metric[:, others].abs().max() < 1e-6
        assert k.item() == 2 and metric.trace().item() == pytest.approx(1.0, abs=1e-6)
    w = teacher[2].weight
    row, dimension = head_space_metric(w, "row", isotropic=0.0)
    expected = torch.zeros(8, 8)
    expected[2, 2] = expected[5, 5] = 0.5
    assert dimension.item() == 2 and torch.allclose(row, expected, atol=1e-6)
    null, dimension = head_space_metric(w, "null", isotropic=0.0)
    assert dimension.item() == 6 and null[[2, 5]].abs().max() < 1e-6
    assert torch.allclose(null[others][:, others], torch.eye(6) / 6, atol=1e-6)
    with pytest.raises(ValueError, match="null space is empty; use directions: row"):
        head_space_metric(torch.randn(8, 4), "null")


def test_the_distiller_builds_the_metric_at_the_head_input_for_each_variant():
    teacher = two_channel_teacher()
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    metrics = {}
    for directions in ("fisher", "complement", "row", "null"):
        torch.manual_seed(0)
        student = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
        fisher = {"axis": "direction", "directions": directions, "energy": 1.0, "isotropic": 0.0, "every": 1}
        spec = {"name": "fitnet", "pairs": [["2:in", "2:in"]], "fisher": fisher}
        distiller = Distiller(student, teacher, [spec], example_input=x[:2])
        distiller(x, y)
        metrics[directions] = distiller.fisher["fitnet"].last_weights
        if directions == "row":  # the drawn map is each channel's share C·diag(M), floored for the log scale
            (drawn,) = distiller.fisher_heatmaps().values()
            assert torch.allclose(drawn, torch.tensor([1e-3, 1e-3, 4, 1e-3, 1e-3, 4, 1e-3, 1e-3]), atol=1e-5)
    on = torch.zeros(8, dtype=torch.bool)
    on[[2, 5]] = True
    for name in ("fisher", "row"):
        assert metrics[name][~on].abs().max() < 1e-6, name
    for name in ("complement", "null"):
        assert metrics[name][on].abs().max() < 1e-6 and metrics[name].trace().item() == pytest.approx(1.0), name


def test_a_metric_from_the_head_needs_the_head_input():
    x, y = tiny_image_batch()
    for fisher in ({"directions": "row"}, {"estimator": "linear_head"}):
        spec = {"name": "fitnet", "pairs": [["block1", "block1"]], "fisher": {"axis": "direction", **fisher}}
        distiller = Distiller(TinyCNN(4), TinyCNN(8), [spec], example_input=x[:2])
        with pytest.raises(ValueError, match=r"'direction': a metric from the head lives at its input \(16 channels\)"
                                             r", but the method has a teacher feature of shape \(16, 8, 8, 8\)"):
            distiller(x, y)


def naive_fitnet(student: torch.Tensor, teacher: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
    d = (student - teacher).double()
    m = metric.double()
    per_sample = []
    for b in range(d.shape[0]):
        if d.dim() == 3:
            vectors = [d[b, t] for t in range(d.shape[1])]
        elif d.dim() == 2:
            vectors = [d[b]]
        else:
            vectors = [d[b, :, i, j] for i in range(d.shape[2]) for j in range(d.shape[3])]
        per_sample.append(sum(v @ m @ v for v in vectors) / len(vectors))
    return torch.stack(per_sample).mean()


@pytest.mark.parametrize("shape", [(3, 8, 4, 5), (3, 8), (3, 6, 8)], ids=["map", "vector", "tokens"])
def test_fitnet_with_a_metric_is_the_quadratic_form_and_the_plain_mse_at_identity_over_c(shape):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    assert torch.allclose(Fn.fitnet(s, t, metric=torch.eye(8) / 8), Fn.fitnet(s, t), rtol=1e-6, atol=0)
    a = torch.randn(8, 8, generator=g)
    metric = a @ a.T / 8
    loss = Fn.fitnet(s, t, metric=metric)
    assert torch.allclose(loss.double(), naive_fitnet(s, t, metric), rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 like the plain hint, not a bf16 matmul
        assert torch.allclose(Fn.fitnet(s, t, metric=metric), loss, rtol=1e-6, atol=0)
    weights = torch.rand(3, generator=g) + 0.5
    plain_weighted = Fn.fitnet(s, t, sample_weight=weights)
    assert torch.allclose(Fn.fitnet(s, t, metric=torch.eye(8) / 8, sample_weight=weights), plain_weighted, rtol=1e-6)
    if len(shape) > 2:  # position weights: one per sample and position, the feature's shape without channels
        where = [d for d in range(len(shape)) if d != (1 if len(shape) == 4 else 2)]
        position = torch.rand([shape[d] for d in where], generator=g) + 0.5
        assert torch.allclose(Fn.fitnet(s, t, metric=torch.eye(8) / 8, position_weight=position),
                              Fn.fitnet(s, t, position_weight=position), rtol=1e-6)
    with pytest.raises(ValueError, match=r"fitnet: metric of shape \(6, 6\) does not fit .* expected \(8, 8\)"):
        Fn.fitnet(s, t, metric=torch.eye(6))


@pytest.mark.parametrize(
    "pair, fisher",
    [
        ("block2", {}),
        ("block2", {"directions": "complement"}),
        ("head:in", {"estimator": "linear_head"}),
        ("head:in", {"directions": "row"}),
        ("head:in", {"directions": "null", "rank": 3}),
    ],
    ids=["fisher", "complement", "linear_head", "row", "null"],
)
def test_fitnet_with_fisher_directions_trains(pair, fisher):
    assert_trains({"name": "fitnet", "pairs": [[pair, pair]], "fisher": {"axis": "direction", "every": 2, **fisher}})


def test_fitnet_on_transformer_hidden_states_trains_with_fisher_directions():
    from fisherkd.models import create_model

    torch.manual_seed(0)
    teacher = create_model("vit_tiny", 3, 5, dim=32, depth=1, heads=4)
    student = create_model("vit_tiny", 3, 5, dim=16, depth=1, heads=4)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    spec = {"name": "fitnet", "pairs": [["blocks.0", "blocks.0"]], "fisher": {"axis": "direction", "every": 1}}
    assert_trains(spec, student, teacher, x, y, steps=10)


def test_gamma_or_lambda_zero_is_plain_fitnet_bitwise():
    def run(fisher: dict | None) -> torch.Tensor:
        torch.manual_seed(0)
        x, y = tiny_image_batch()
        spec = {"name": "fitnet", "pairs": [["block2", "block2"]], **({"fisher": fisher} if fisher else {})}
        distiller = Distiller(TinyCNN(4), TinyCNN(8), [spec], example_input=x[:2])
        return torch.stack([distiller(x, y).loss.detach() for _ in range(2)])

    plain = run(None)
    assert torch.equal(run({"axis": "direction", "gamma": 0.0}), plain)
    assert torch.equal(run({"axis": "direction", "lam": 0.0}), plain)
    assert not torch.equal(run({"axis": "direction"}), plain)


def test_the_direction_step_reads_nothing_on_the_host(monkeypatch):
    torch.manual_seed(0)
    x, y = tiny_image_batch()
    specs = [
        {"name": "fitnet", "pairs": [["block2", "block2"]], "fisher": {"axis": "direction", "every": 1}},
        {"name": "fitnet", "pairs": [["block1", "block1"]],
         "fisher": {"axis": "direction", "directions": "complement"}},
        {"name": "fitnet", "pairs": [["head:in", "head:in"]], "fisher": {"axis": "direction", "directions": "row"}},
    ]
    distiller = Distiller(TinyCNN(4), TinyCNN(8), specs, example_input=x[:2])

    forbid_host_reads(monkeypatch)
    for _ in range(2):
        out = distiller(x, y)
        out.loss.backward()
        distiller.after_optimizer_step()
    monkeypatch.undo()
    assert {k for k in out.stats if k.endswith(".rank")} == {f"fisher.{label}.direction.rank" for label in
                                                            distiller.fisher}


def direction_distiller() -> Distiller:
    torch.manual_seed(0)
    x, _ = tiny_image_batch()
    spec = {"name": "fitnet", "pairs": [["block2", "block2"]], "fisher": {"axis": "direction", "every": 2}}
    return Distiller(TinyCNN(4), TinyCNN(8), [spec], example_input=x[:2])


def test_checkpoint_round_trip_gives_the_same_metric(tmp_path):
    x, y = tiny_image_batch()
    trained = direction_distiller()
    for _ in range(3):
        trained(x, y).loss.backward()
        trained.after_optimizer_step()
    save_atomic({"distiller": trained.training_state_dict()}, tmp_path / "ckpt.pt")
    restored = direction_distiller()
    restored.load_state_dict(load_checkpoint(tmp_path / "ckpt.pt")["distiller"], strict=False)
    before, again = trained.fisher["fitnet"], restored.fisher["fitnet"]
    assert again.statistic.value.shape == (16, 16) and again.statistic.updates == 2
    trained.eval(), restored.eval()
    metric, _ = before(FisherBatch(x, trained.teacher, trained.teacher(x)))
    assert torch.equal(again(FisherBatch(x, restored.teacher, restored.teacher(x)))[0], metric)


def half_batch_statistic(estimator: str, rank: int | None) -> torch.Tensor:
    teacher = two_channel_teacher()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 6, generator=g), torch.randint(0, 4, (24,), generator=g)
    if rank is not None:
        x, y = x[rank * 12 : (rank + 1) * 12], y[rank * 12 : (rank + 1) * 12]
    spec = FisherSpec(axis="direction", estimator=estimator, every=1, fraction=1.0, ema=0.5)
    weighter = FisherWeighter(spec, "test", tap="2:in")
    feature = teacher[:2](x)
    for _ in range(2):
        weighter(FisherBatch(x, teacher, teacher(x), y, feature=feature))
        weighter.after_optimizer_step()
    return weighter.statistic.read()


def gloo_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=__import__("datetime").timedelta(seconds=60))
    try:
        stats = [half_batch_statistic(estimator, rank) for estimator in ("empirical", "linear_head")]
        torch.save(stats, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_reduce_the_matrix_to_the_statistic_of_the_whole_batch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(gloo_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for i, estimator in enumerate(("empirical", "linear_head")):
        whole = half_batch_statistic(estimator, None)
        assert whole.shape == (8, 8) and torch.equal(ranks[0][i], ranks[1][i])
        assert torch.allclose(ranks[0][i], whole, rtol=1e-5, atol=1e-8), estimator


def base_config(fisher: dict) -> dict:
    method = {"name": "fitnet", "pairs": [["features", "features"]], "fisher": fisher}
    return {"teacher": {"name": "cnn1d"}, "student": {"name": "mlp"}, "methods": [{"name": "ce"}, method]}


def test_config_path_validates_and_names_the_nearest_values():
    config = build_config(base_config({"axis": "direction", "directions": "complement"}))
    assert config.methods[1].fisher.directions == "complement"
    with pytest.raises(ConfigError, match=r"methods\.1\.fisher.*unknown directions 'complemnt'.*complement"):
        build_config(base_config({"axis": "direction", "directions": "complemnt"}))
    with pytest.raises(ConfigError, match=r"methods\.1\.fisher.*unknown axis 'directoin'.*direction"):
        build_config(base_config({"axis": "directoin"}))
    with pytest.raises(ConfigError, match=r"methods\.1\.fisher.*energy, isotropic apply to axis direction only"):
        build_config(base_config({"axis": "channel", "energy": 0.9, "isotropic": 0.0}))
    with pytest.raises(ConfigError, match=r"methods\.0: method 'at' cannot be Fisher-weighted along 'direction'"):
        build_config({**base_config({}), "methods": [{"name": "at", "pairs": [["a", "a"]],
                                                      "fisher": {"axis": "direction"}}]})
