"""DDP on CPU with gloo: two processes reach the weights of one process with the same global batch."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fisherkd.config import TrainConfig
from fisherkd.data import ArrayDataset, DataSplits
from fisherkd.distiller import Distiller
from fisherkd.engine import Trainer
from fisherkd.models import create_model
from helpers import free_port


def splits() -> DataSplits:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, 40, generator=g)
    y = (x[:, :20].sum(1) > 0).long() + 2 * (x[:, 20:].sum(1) > 0).long()
    return DataSplits("toy", ArrayDataset(x[:128], y[:128]), ArrayDataset(x[128:], y[128:]), 4, (40,))


def train_once(run_dir) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    teacher = create_model("cnn1d", 1, 4)
    student = create_model("mlp", 1, 4, hidden=(32,))
    specs = [{"name": "ce", "weight": 0.5}, {"name": "kd", "weight": 0.5},
             {"name": "fitnet", "weight": 1.0, "pairs": [["features", "features"]]},
             # a memory bank (a buffer, which DDP broadcasts from rank 0) written with every rank's rows
             {"name": "crd", "pairs": [["features", "features"]], "num_data": 128, "nce_k": 16, "embed_dim": 8},
             # a queue: the order of its rows is the global batch's order
             {"name": "crd", "pairs": [["features", "features"]], "num_data": 128, "queue_size": 48, "embed_dim": 8}]
    distiller = Distiller(student, teacher, specs, example_input=torch.zeros(2, 40))
    config = TrainConfig(epochs=2, batch_size=32, log_every=2, optimizer={"name": "sgd", "lr": 0.1})
    trainer = Trainer(distiller, splits(), config, device="cpu", seed=3, run_dir=run_dir)
    first_batch = next(iter(trainer.loader.epoch(0))).index
    trainer.fit()
    return {k: v.clone() for k, v in distiller.training_state_dict().items()}, first_batch


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    weights, first_batch = train_once(out_dir)
    torch.save({"weights": weights, "first_batch": first_batch}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(tmp_path):
    single, global_batch = train_once(tmp_path / "single")
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # each rank computes on its own half of every global batch
    halves = rank0["first_batch"], rank1["first_batch"]
    assert len(halves[0]) == len(halves[1]) == 16
    assert sorted(torch.cat(halves).tolist()) == sorted(global_batch.tolist())
    rank0, rank1 = rank0["weights"], rank1["weights"]
    assert {"methods.3.student_memory", "methods.4.teacher_memory", "methods.4.queue_pointer"} <= set(single)
    for key, value in single.items():  # weights and CRD's memory: every row written by either rank is in both
        assert torch.equal(rank0[key], rank1[key]), key  # DDP keeps the replicas identical
        assert torch.allclose(rank0[key], value, atol=1e-5), key
    # only rank 0 wrote checkpoints (into the shared run directory), and they are complete
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
