"""Methods with adapters, Fisher weights and DSKD's projectors under DDP on the CPU (gloo): two processes reach the
student, adapter, Fisher-statistic and projector values of one process with the same global batch.

Each process is given its own ``seed`` (the data order is pinned by ``data_seed``), so the adapters and projectors,
which are built after the Trainer seeds the process, start apart unless the trainer copies them from process 0.
"""

import os
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from helpers import free_port  # noqa: E402

STEPS = 3
SEED = 10  # of the one process and of process 0; process 1 gets SEED + 1
# fitnet: student hidden size 8 against the teacher's 16, so a connector is trained; fisher_logit: KD's quadratic
# form weighted per class by an EMA of the teacher's p(1 - p), estimated every step on the whole batch (the closed
# form: no sampling, so one process and two see the same statistic when it is all-reduced)
METHODS = [
    {"name": "fitnet", "pairs": [("bert.encoder.layer.1", "bert.encoder.layer.3")]},
    {"name": "fisher_logit", "fisher": {"axis": "class", "estimator": "logit", "every": 1, "fraction": 1.0}},
    "ce",
]


def methods_run(
    out_dir: str, batch_size: int, accumulation: int = 1, seed: int = 0, train: bool = True, **distributed
) -> dict:
    from test_layers import tiny_bert
    from test_trainer import arguments, text_examples

    from fisherkd.hf import DistillationConfig, DistillationTrainer

    torch.manual_seed(0)
    teacher, student = tiny_bert(layers=4), tiny_bert(layers=2, hidden=8)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        distillation=DistillationConfig(methods=METHODS),
        args=arguments(
            out_dir,
            max_steps=STEPS,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            learning_rate=1e-2,
            seed=seed,
            data_seed=0,
            **distributed,
        ),
        train_dataset=text_examples(16),
    )
    initial = {k: v.clone() for k, v in trainer.distiller.adapters.state_dict().items()}
    if not train:
        return initial
    trainer.train()
    state = {f"student.{k}": v for k, v in trainer.model.state_dict().items()}
    state["logged"] = torch.tensor([e["distill/fitnet"] for e in trainer.state.log_history if "distill/fitnet" in e])
    state |= {f"adapters.{k}": v for k, v in trainer.distiller.adapters.state_dict().items()}
    state |= {f"fisher.{k}": v for k, v in trainer.distiller.fisher.state_dict().items() if torch.is_tensor(v)}
    state |= {f"initial.{k}": v for k, v in initial.items()}
    return {k: v.detach().clone() for k, v in state.items()}


def dskd_run(out_dir: str, batch_size: int, seed: int = 0, **distributed) -> dict:
    from test_cross_tokenizer_trainer import TEXTS, dataset, dskd_trainer

    trainer = dskd_trainer(
        out_dir,
        data=dataset(TEXTS + TEXTS[:4]),  # STEPS global batches of 4, one epoch
        max_steps=STEPS,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-2,
        seed=seed,
        data_seed=0,
        **distributed,
    )
    initial = {k: v.clone() for k, v in trainer.dskd_projectors.state_dict().items()}
    trainer.train()
    state = {f"student.{k}": v for k, v in trainer.model.state_dict().items()}
    state["logged"] = torch.tensor([e["distill/dskd"] for e in trainer.state.log_history if "distill/dskd" in e])
    state |= {f"projectors.{k}": v for k, v in trainer.dskd_projectors.state_dict().items()}
    state |= {f"initial.{k}": v for k, v in initial.items()}
    return {k: v.detach().clone() for k, v in state.items()}


def worker(rank: int, port: int, out_dir: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    ddp = {"ddp_backend": "gloo", "seed": SEED + rank}
    results = {
        "methods": methods_run(os.path.join(out_dir, f"m{rank}"), batch_size=2, **ddp),
        "accumulated": methods_run(os.path.join(out_dir, f"a{rank}"), batch_size=1, accumulation=2, **ddp),
        "dskd": dskd_run(os.path.join(out_dir, f"d{rank}"), batch_size=2, **ddp),
    }
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Each scenario in one process (global batch 4) and on both of two gloo processes (2 each)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ddp")
    single = {
        "methods": methods_run(str(out / "single_m"), batch_size=4, seed=SEED),
        # the same optimizer steps of 2 x 2: the Fisher statistic is updated on the first micro-batch of a step
        "accumulated": methods_run(str(out / "single_a"), batch_size=2, accumulation=2, seed=SEED),
        "dskd": dskd_run(str(out / "single_d"), batch_size=4, seed=SEED),
        # what process 1 would start from without the copy from process 0
        "own_adapters": methods_run(str(out / "own"), batch_size=2, seed=SEED + 1, train=False),
    }
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=2, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return {"single": single, "ranks": ranks}


def assert_matches_one_process(runs: dict, scenario: str, trained_prefix: str) -> None:
    single, (rank0, rank1) = runs["single"][scenario], (r[scenario] for r in runs["ranks"])
    assert set(rank0) == set(rank1) == set(single)
    assert any(k.startswith(trained_prefix) for k in single)
    assert len(single["logged"]) == STEPS  # the logged terms are the global batch's too, on every process
    for key, value in single.items():
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)  # the replicas agree exactly
        # Adam turns the float noise of a near-zero gradient into steps of up to ~1e-5 (an attention key bias);
        # the Fisher statistics are averages of p(1 - p), held to float precision
        tolerance = dict(rtol=1e-5, atol=1e-8) if key.startswith("fisher.") else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(rank0[key], value, **tolerance, msg=lambda m, key=key: f"{key}: {m}")
    for key in single:  # the extra parameters were trained, not only copied
        if key.startswith(trained_prefix):
            start = single[key.replace(trained_prefix, "initial.", 1)]
            assert not torch.allclose(single[key], start), key


@pytest.mark.parametrize("scenario", ["methods", "accumulated"])
def test_adapters_and_fisher_weights_under_ddp_match_one_process(runs, scenario):
    assert_matches_one_process(runs, scenario, "adapters.")
    # the Fisher statistic (an EMA of all ranks' rows) was estimated, and is the one process's
    own = runs["single"]["own_adapters"]  # process 1's own draw differs, so the copy from process 0 was needed
    assert any(not torch.equal(v, runs["ranks"][1][scenario][f"initial.{k}"]) for k, v in own.items())
    fisher = [k for k in runs["single"][scenario] if k.startswith("fisher.")]
    assert fisher and all(runs["single"][scenario][k].numel() == 3 for k in fisher)  # one entry per class


def test_dskd_projectors_under_ddp_match_one_process(runs):
    assert_matches_one_process(runs, "dskd", "projectors.")
