import csv

import pytest

from fisherkd.config import TrackingConfig
from fisherkd.tracking import Tracker, read_metrics


def test_jsonl_and_csv(tmp_path):
    tracker = Tracker(tmp_path)
    tracker.log(1, {"loss": 2.0})
    tracker.log(2, {"loss": 1.5, "lr": 0.1})
    tracker.log(2, {"accuracy": 0.5}, "test")
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 2]  # written before close
    assert [r["step"] for r in tracker.truncate(1)] == [1]
    tracker.log(2, {"loss": 1.4})
    tracker.close()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [(r["step"], r["loss"]) for r in rows] == [("1", "2.0"), ("2", "1.4")]


def test_tensorboard_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    tracker = Tracker(tmp_path, TrackingConfig(tensorboard=True))
    tracker.log(1, {"loss": 2.0})
    tracker.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_wandb_offline_needs_no_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_API_KEY", "")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    tracker = Tracker(tmp_path, TrackingConfig(wandb=True, wandb_mode="offline"), {"seed": 0})
    tracker.log(1, {"loss": 2.0})
    tracker.close()
    offline_runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert offline_runs and list(offline_runs[0].glob("*.wandb"))
