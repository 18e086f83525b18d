"""EMA bias correction, the update schedule (every K steps, fraction ρ, freeze), checkpoint round trips, and two
gloo processes reducing to the statistics of one process on the whole batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fisherkd.distiller import Distiller
from fisherkd.engine.checkpoint import load_checkpoint, save_atomic
from fisherkd.fisher import EMAStatistic, FisherBatch, FisherSpec, FisherWeighter
from fisherkd.models import create_model
from helpers import TinyCNN, tiny_image_batch


def test_ema_is_exact_after_one_update_and_a_normalized_average_after_many():
    ema = EMAStatistic(0.9)
    assert ema.read() is None
    xs = [torch.randn(3) for _ in range(50)]
    ema.update(xs[0])
    assert torch.allclose(ema.read(), xs[0])  # no pull towards the zero initial value
    for x in xs[1:]:
        ema.update(x)
    weights = [0.1 * 0.9 ** (49 - i) for i in range(50)]
    expected = sum(w * x for w, x in zip(weights, xs)) / sum(weights)  # Σw = 1 − 0.9^50: the correction
    assert torch.allclose(ema.read(), expected, atol=1e-6)
    constant = EMAStatistic(0.99)
    for _ in range(7):
        constant.update(torch.full((2,), 3.0))
    assert torch.allclose(constant.read(), torch.full((2,), 3.0))


def channel_distiller(**fisher) -> Distiller:
    torch.manual_seed(0)
    x, _ = tiny_image_batch()
    spec = {"name": "fitnet", "pairs": [["block2", "block2"]], "fisher": {"axis": "channel", **fisher}}
    return Distiller(TinyCNN(4), TinyCNN(8), [spec], example_input=x[:2])


def run_steps(distiller: Distiller, steps: int, seed: int = 0) -> list[torch.Tensor]:
    x, y = tiny_image_batch(seed=seed)
    outs = []
    for _ in range(steps):
        out = distiller(x, y)
        out.loss.backward()
        distiller.after_optimizer_step()
        outs.append(out.loss.detach())
    return outs


def test_updates_every_k_steps_on_a_fraction_and_freeze():
    distiller = channel_distiller(every=3, fraction=0.25, freeze_after=7)
    weighter = distiller.fisher["fitnet"]
    calls = []
    original = weighter._scores
    weighter._scores = lambda batch, rows: calls.append(rows) or original(batch, rows)
    run_steps(distiller, 12)
    assert calls == [4, 4, 4]  # steps 0, 3, 6 on ⌈0.25·16⌉ samples; frozen from step 7
    assert weighter.statistic.updates == 3
    distiller.eval()
    run_steps(distiller, 1)  # evaluation never updates the statistic
    assert weighter.statistic.updates == 3


def test_checkpoint_round_trip_restores_statistics_schedule_and_sampling(tmp_path):
    trained = channel_distiller(every=2)
    run_steps(trained, 5)
    save_atomic({"distiller": trained.training_state_dict()}, tmp_path / "ckpt.pt")
    weighter = trained.fisher["fitnet"]
    assert weighter.statistic.updates == 3 and weighter.step == 5

    restored = channel_distiller(every=2)
    missing, unexpected = restored.load_state_dict(load_checkpoint(tmp_path / "ckpt.pt")["distiller"], strict=False)
    assert not unexpected and all(k.startswith("teacher.") for k in missing)
    again = restored.fisher["fitnet"]
    assert again.step == 5 and again.statistic.updates == 3
    assert torch.equal(again.statistic.value, weighter.statistic.value)
    # the next steps (an update at step 6 drawing labels from the restored generator) are identical
    assert torch.equal(torch.stack(run_steps(trained, 3, seed=1)), torch.stack(run_steps(restored, 3, seed=1)))
    assert torch.equal(again.statistic.value, weighter.statistic.value)


def half_batch_statistics(axis: str, estimator: str, rank: int | None) -> torch.Tensor:
    torch.manual_seed(0)
    teacher = create_model("cnn1d", 1, 4).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 40, generator=g), torch.randint(0, 4, (24,), generator=g)
    if rank is not None:
        x, y = x[rank * 12 : (rank + 1) * 12], y[rank * 12 : (rank + 1) * 12]
    spec = FisherSpec(axis=axis, estimator=estimator, every=1, fraction=1.0, ema=0.5)
    weighter = FisherWeighter(spec, "test", tap="features.5")
    feature = teacher.features[:6](x[:, None])
    for _ in range(2):  # two updates: the EMA of reduced statistics
        weighter(FisherBatch(x, teacher, teacher(x), y, feature=feature))
        weighter.after_optimizer_step()
    return weighter.statistic.read()


CASES = [("channel", "empirical"), ("channel", "linear_head"), ("class", "logit")]


def gloo_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=__import__("datetime").timedelta(seconds=60))
    try:
        stats = [half_batch_statistics(axis, estimator, rank) for axis, estimator in CASES]
        torch.save(stats, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_the_statistics_of_one_process_on_the_whole_batch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(gloo_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for i, (axis, estimator) in enumerate(CASES):
        whole = half_batch_statistics(axis, estimator, None)
        assert torch.equal(ranks[0][i], ranks[1][i]), axis
        assert torch.allclose(ranks[0][i], whole, rtol=1e-5, atol=1e-8), (axis, estimator)


def test_statistic_buffer_is_sized_on_first_update_and_on_load():
    fresh = EMAStatistic(0.9)
    fresh.update(torch.ones(4))
    other = EMAStatistic(0.9)
    other.load_state_dict(fresh.state_dict())
    assert other.value.shape == (4,) and other.updates == 1
    with pytest.raises(ValueError, match="beta"):
        EMAStatistic(1.0)
