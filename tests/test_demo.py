"""The demo end to end on a tiny budget (the full demo's numbers are in the README, measured separately)."""

import json

from fisherkd.cli import main


def test_demo_prints_a_table_and_writes_results_and_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path / "cache"))
    args = ["demo", "--output", str(tmp_path / "demo"), "--seeds", "2", "teacher.train.epochs=2", "train.epochs=1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "test acc %" in out and "scratch" in out and "kd" in out
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert [r["seeds"] for r in results["rows"]] == [2] * len(results["rows"])
    assert all(0.0 <= r["accuracy_mean"] <= 100.0 and len(r["accuracies"]) == 2 for r in results["rows"])
    assert 0 < results["teacher_accuracy"] <= 100
    assert (tmp_path / "demo" / "comparison.png").stat().st_size > 10_000
    assert (tmp_path / "demo" / "results.md").read_text().count("\n|") >= len(results["rows"])
