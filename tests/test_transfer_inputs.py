"""Transfer inputs that only the teacher labels: data.labelled hides labels, data.transfer draws more inputs from
MNIST-1D's generator; the teacher trains on the labelled samples, CE leaves the rest out, KD uses them all."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fisherkd import functional as Fn
from fisherkd.config import DataConfig, build_config
from fisherkd.core import UNLABELLED
from fisherkd.data import ArrayDataset, DataSplits, load_splits
from fisherkd.run import teacher_data_key, train


def toy_splits(n: int = 64) -> DataSplits:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 12, generator=g)
    y = (x[:, :6].sum(1) > 0).long() + (x[:, 6:].sum(1) > 0).long()
    return DataSplits("toy", ArrayDataset(x, y), ArrayDataset(x[:16], y[:16]), 3, (12,))


def test_cross_entropy_leaves_unlabelled_rows_out_and_is_zero_without_labels():
    logits, target = torch.randn(5, 3), torch.tensor([0, UNLABELLED, 2, UNLABELLED, 1])
    labelled = target != UNLABELLED
    expected = F.cross_entropy(logits[labelled], target[labelled])  # the mean over the labelled rows only
    torch.testing.assert_close(Fn.cross_entropy(logits, target), expected)
    none = Fn.cross_entropy(logits, torch.full((5,), UNLABELLED))
    assert none.item() == 0.0  # a batch of transfer inputs only: 0, not 0/0 (a NaN would stop the run)


def test_hidden_labels_keep_a_fixed_subset_and_the_teacher_trains_on_it():
    splits = toy_splits()
    hidden = splits.with_hidden_labels(10, seed=3)
    kept = hidden.train.y != UNLABELLED
    assert int(kept.sum()) == 10 and torch.equal(hidden.train.x, splits.train.x)
    assert torch.equal(hidden.train.y[kept], splits.train.y[kept])
    assert torch.equal(splits.with_hidden_labels(10, seed=3).train.y, hidden.train.y)  # the same choice each time
    teacher_data = hidden.labelled_only()
    assert len(teacher_data.train) == 10 and not teacher_data.has_unlabelled and hidden.has_unlabelled
    with pytest.raises(ValueError, match="data.labelled=65"):
        splits.with_hidden_labels(65)


def test_mnist1d_transfer_inputs_come_from_the_generator_not_the_split(tmp_path, monkeypatch):
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path))
    plain = load_splits(DataConfig(name="mnist1d"))
    extended = load_splits(DataConfig(name="mnist1d", transfer=300))
    assert len(extended.train) == len(plain.train) + 300
    assert torch.equal(extended.train.x[: len(plain.train)], plain.train.x)
    extra = extended.train.x[len(plain.train) :]
    assert (extended.train.y[len(plain.train) :] == UNLABELLED).all()
    # new inputs, not copies of the training split
    assert torch.cdist(extra[:50], plain.train.x).min() > 0
    np.savez(tmp_path / "toy.npz", x=np.zeros((8, 4), "float32"), y=np.arange(8) % 2)
    with pytest.raises(ValueError, match="only mnist1d"):
        load_splits(DataConfig(name="npz", root=str(tmp_path / "toy.npz"), transfer=10))


def test_transfer_inputs_do_not_change_the_teachers_cache_key():
    plain = teacher_data_key(DataConfig(name="mnist1d"))
    assert plain == {"name": "mnist1d", "root": None, "train_subset": None}  # as before the options: caches still hit
    assert teacher_data_key(DataConfig(name="mnist1d", transfer=300)) == plain  # the teacher never sees them
    assert teacher_data_key(DataConfig(name="mnist1d", labelled=100)) != plain  # it trains on fewer labels


def test_a_run_with_transfer_inputs_trains_kd_on_all_and_ce_on_the_labelled(tmp_path, monkeypatch):
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path / "cache"))
    raw = {
        "name": "transfer", "output_dir": str(tmp_path),
        "teacher": {"name": "mlp", "kwargs": {"in_features": 12}, "train": {"epochs": 1, "batch_size": 16}},
        "student": {"name": "mlp", "kwargs": {"in_features": 12, "hidden": [8]}},
        "methods": [{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9}],
        "train": {"epochs": 1, "batch_size": 16},
    }  # fmt: skip
    summary = train(build_config(raw), splits=toy_splits().with_hidden_labels(8))
    assert summary["steps"] == 64 // 16 and 0 <= summary["test_accuracy"] <= 1
    with pytest.raises(ValueError, match="method 'dkd' needs a label for every sample"):
        train(build_config({**raw, "methods": [{"name": "dkd"}]}), splits=toy_splits().with_hidden_labels(8))
