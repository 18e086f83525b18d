import csv
import json

import numpy as np
import pytest
import yaml

from fisherkd.cli import main
from fisherkd.compare import CompareOptions, default_title, merged, method_recipe, row_label
from fisherkd.config import ConfigError, build_config


def test_method_recipes_follow_the_authors_pairing():
    options = CompareOptions(feature_pairs=[("block2", "block2")])
    assert method_recipe("kd", options, 100) == [{"name": "ce", "weight": 0.1}, {"name": "kd"}]
    assert method_recipe("at", options, 100)[1] == {"name": "at", "pairs": [["block2", "block2"]]}
    assert method_recipe("rkd", options, 100)[1]["pairs"] == [["head:in", "head:in"]]
    assert method_recipe("crd", options, 100)[1]["num_data"] == 100
    own_pairs = CompareOptions(feature_pairs=[("block2", "block2")], hparams={"relation": {"pairs": [["b1", "b1"]]}})
    assert method_recipe("relation", own_pairs, 100)[1]["pairs"] == [["b1", "b1"]]
    with pytest.raises(ConfigError, match="compare.feature_pairs"):
        method_recipe("at", CompareOptions(), 100)


def test_variants_merge_mappings_into_the_base_and_replace_everything_else():
    base = {"train": {"epochs": 40, "augment": {"noise": 0.1}}, "methods": [{"name": "ce"}], "teacher": {"name": "t"}}
    variant = {"train": {"augment": {"mixup_alpha": 1.0}}, "methods": [{"name": "kd"}],
               "teacher": {"name": None, "members": [{"name": "t"}]}}
    assert merged(base, variant) == {
        "train": {"epochs": 40, "augment": {"noise": 0.1, "mixup_alpha": 1.0}},
        "methods": [{"name": "kd"}],
        "teacher": {"name": None, "members": [{"name": "t"}]},
    }
    assert base["train"]["augment"] == {"noise": 0.1}  # the base is left as it was


def test_a_row_with_its_own_teacher_says_how_good_that_teacher_is():
    table = {"teacher_accuracy": 91.6}
    assert row_label({"variant": "kd", "teacher_accuracy": 0.916}, table) == "kd"
    assert row_label({"variant": "kd, ens", "teacher_accuracy": 0.934}, table) == "kd, ens (its teacher: 93.4)"
    assert row_label({"variant": "scratch"}, {"teacher_accuracy": None}) == "scratch"


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


def toy_compare_file(tmp_path, epochs=2, **extra):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(160, 40)).astype("float32")
    np.savez(tmp_path / "toy.npz", x=x, y=(x[:, :20].sum(1) > 0).astype("int64"))
    config = {
        "data": {"name": "npz", "root": str(tmp_path / "toy.npz")},
        "teacher": {"name": "cnn1d", "train": {"epochs": 1, "batch_size": 32}},
        "student": {"name": "mlp"},
        "train": {"epochs": epochs, "batch_size": 32},
        **extra,
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    return str(tmp_path / "c.yaml")


def test_compare_resume_reuses_finished_runs_and_continues_interrupted_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path / "cache"))
    fisher_kd = [{"name": "ce", "weight": 0.1}, {"name": "kd", "fisher": {"axis": "sample"}}]
    path = toy_compare_file(tmp_path, variants={"kd, Fisher samples": {"methods": fisher_kd}})
    args = ["compare", path, "--methods", "kd", "--seeds", "1", "--output", str(tmp_path / "out"), "--resume"]
    assert main(args) == 0
    runs = tmp_path / "out" / "runs"
    first = json.loads((tmp_path / "out" / "results.json").read_text())
    # --methods recipes first, then the file's variants
    assert [r["variant"] for r in first["rows"]] == ["scratch", "kd", "kd, Fisher samples"]
    assert sorted(p.name for p in runs.iterdir()) == ["kd-seed0", "kd_Fisher_samples-seed0", "scratch-seed0"]

    finished = (runs / "kd-seed0" / "summary.json").stat().st_mtime_ns
    (runs / "scratch-seed0" / "summary.json").unlink()  # as if stopped after its last checkpoint
    (runs / "kd_Fisher_samples-seed0" / "checkpoints" / "last.pt").unlink()  # as if stopped before one
    (runs / "kd_Fisher_samples-seed0" / "summary.json").unlink()
    assert main(args) == 0
    second = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (runs / "kd-seed0" / "summary.json").stat().st_mtime_ns == finished
    assert sorted(p.name for p in runs.iterdir()) == ["kd-seed0", "kd_Fisher_samples-seed0", "scratch-seed0"]
    for a, b in zip(first["rows"], second["rows"]):
        # the continued run starts again from its final checkpoint and the restarted run is trained again:
        # deterministic on CPU, so every row is what it was
        assert a["accuracies"] == b["accuracies"], a["variant"]

    changed = toy_compare_file(tmp_path, variants={"kd, Fisher samples": {"methods": fisher_kd}}, epochs=3)
    assert main(["compare", changed, *args[2:]]) == 2  # same output, another config: refused, nothing mixed


def test_variant_names_may_not_shadow_method_recipes(tmp_path, monkeypatch):
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path / "cache"))
    path = toy_compare_file(tmp_path, variants={"kd": {"methods": [{"name": "kd"}]}})
    assert main(["compare", path, "--methods", "kd", "--output", str(tmp_path / "out")]) == 2


def test_the_title_of_a_pruned_student_names_its_teacher():
    config = build_config(
        {"teacher": {"name": "cnn1d"}, "student": {"from_teacher": {"width": 0.5}}, "methods": [{"name": "kd"}]}
    )
    assert default_title(config) == "mnist1d: cnn1d teacher → pruned cnn1d student"
