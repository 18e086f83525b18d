"""A Fisher-weighted run end to end: stats logged, heat map and weights written, exact resume."""

import json

import torch

from fisherkd.config import build_config
from fisherkd.data import ArrayDataset, DataSplits
from fisherkd.run import train
from fisherkd.tracking import read_metrics


def toy_splits() -> DataSplits:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 40, generator=g)
    y = (x[:, :10].sum(1) > 0).long() + 2 * (x[:, 10:20].sum(1) > 0).long()
    return DataSplits("toy", ArrayDataset(x[:96], y[:96]), ArrayDataset(x[96:], y[96:]), 4, (40,))


def config(tmp_path):
    fitnet = {"axis": "channel", "every": 3, "fraction": 0.5, "warmup_steps": 6}
    return build_config({
        "name": "fisher",
        "output_dir": str(tmp_path / "runs"),
        "teacher": {"name": "cnn1d", "train": {"epochs": 1, "batch_size": 32}},
        "student": {"name": "mlp", "kwargs": {"hidden": [16]}},
        "methods": [
            {"name": "ce", "weight": 0.1},
            {"name": "kd", "weight": 0.9, "fisher": {"axis": "sample", "gamma": 0.5}},
            {"name": "fitnet", "weight": 1.0, "pairs": [["features", "features"]], "fisher": fitnet},
        ],
        "train": {"epochs": 2, "batch_size": 16, "log_every": 2, "optimizer": {"name": "sgd", "lr": 0.05},
                  "augment": {"mixup_alpha": 0.5}},
    })


def test_weighted_run_logs_stats_draws_the_heat_map_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path / "cache"))
    splits, cfg = toy_splits(), config(tmp_path)
    train(cfg, run_dir=tmp_path / "full", splits=splits)
    rows = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if r["split"] == "train"]
    assert all(0 < r["fisher.kd.sample.entropy"] <= 1 + 1e-6 and r["fisher.fitnet.channel.max_min"] >= 1 for r in rows)
    assert (tmp_path / "full" / "plots" / "fisher_weights.png").stat().st_size > 5_000
    (label, weights), = json.loads((tmp_path / "full" / "fisher_weights.json").read_text()).items()
    assert label.startswith("fitnet: channel") and abs(sum(weights) / len(weights) - 1) < 1e-5
    # interrupted after 4 steps (between updates, mid-warm-up; a log boundary, so the rows average the same steps)
    # and resumed: the same losses at every step
    train(cfg, run_dir=tmp_path / "cut", splits=splits, stop_after_steps=4)
    train(cfg, run_dir=tmp_path / "cut", splits=splits, resume=True)
    resumed = [r for r in read_metrics(tmp_path / "cut" / "metrics.jsonl") if r["split"] == "train"]
    assert [(r["step"], r["loss"]) for r in resumed] == [(r["step"], r["loss"]) for r in rows]
