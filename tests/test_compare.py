import csv
import json

import numpy as np
import pytest
import yaml

from fisherkd.cli import main
from fisherkd.compare import CompareOptions, method_recipe
from fisherkd.config import ConfigError


def test_method_recipes_follow_the_authors_pairing():
    options = CompareOptions(feature_pairs=[("block2", "block2")])
    assert method_recipe("kd", options, 100) == [{"name": "ce", "weight": 0.1}, {"name": "kd"}]
    assert method_recipe("at", options, 100)[1] == {"name": "at", "pairs": [["block2", "block2"]]}
    assert method_recipe("rkd", options, 100)[1]["pairs"] == [["head:in", "head:in"]]
    assert method_recipe("crd", options, 100)[1]["num_data"] == 100
    with pytest.raises(ConfigError, match="compare.feature_pairs"):
        method_recipe("at", CompareOptions(), 100)


def test_compare_cli_writes_table_csv_and_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 40)).astype("float32")
    y = (x[:, :20].sum(1) > 0).astype("int64") + 2 * (x[:, 20:].sum(1) > 0)
    np.savez(tmp_path / "toy.npz", x=x, y=y)
    config = {
        "data": {"name": "npz", "root": str(tmp_path / "toy.npz")},
        "teacher": {"name": "cnn1d", "train": {"epochs": 2, "batch_size": 32}},
        "student": {"name": "mlp"},
        "train": {"epochs": 1, "batch_size": 32},
        "compare": {"feature_pairs": [["features", "features"]]},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    args = ["compare", str(tmp_path / "c.yaml"), "--methods", "kd,fitnet,rkd", "--seeds", "2", "--output",
            str(tmp_path / "out")]
    assert main(args) == 0
    assert "fitnet" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert [r["variant"] for r in rows] == ["scratch", "kd", "fitnet", "rkd"]
    assert all(0 <= float(r["accuracy_mean"]) <= 100 and float(r["seconds_mean"]) > 0 for r in rows)
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["rows"][1]["methods"] == ["ce", "kd"] and len(result["rows"][1]["accuracies"]) == 2
    assert (tmp_path / "out" / "comparison.png").exists()
