import json
import subprocess
import sys

import yaml

from fisherkd.cli import main


def test_methods_json(capsys):
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    kd = next(r for r in rows if r["name"] == "kd")
    assert kd["family"] == "logit" and "Hinton" in kd["paper"]
    assert kd["defaults"] == {"temperature": 4.0, "standardize": False}


def test_bad_config_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"student": {"name": "mlp"}, "methods": [{"name": "dkdd"}]}))
    assert main(["train", str(path)]) == 2
    out = capsys.readouterr().err.strip()
    assert out.startswith("error: config error at methods.0: unknown method 'dkdd'; did you mean: dkd")
    assert len(out.splitlines()) == 1


def test_train_then_eval_from_the_console_script(tmp_path):
    config = {
        "name": "cli",
        "output_dir": str(tmp_path / "runs"),
        "data": {"name": "mnist1d"},
        "teacher": {"name": "cnn1d", "train": {"epochs": 1, "batch_size": 200}},
        "student": {"name": "mlp"},
        "methods": [{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9}],
        "train": {"epochs": 1, "batch_size": 200},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {"FISHERKD_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    run = [sys.executable, "-m", "fisherkd.cli"]
    done = subprocess.run([*run, "train", str(path), "train.optimizer.lr=0.1"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "runs" / "cli"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["optimizer"]["lr"] == 0.1
    done = subprocess.run([*run, "eval", str(run_dir)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert abs(json.loads(done.stdout)["accuracy"] - summary["test_accuracy"]) < 1e-6


def test_the_console_script_prints_one_line_and_debug_keeps_the_traceback(tmp_path):
    run = [sys.executable, "-m", "fisherkd.cli", "eval", str(tmp_path / "no-such-run")]
    env = {"FISHERKD_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(run, capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"error: run directory '{tmp_path / 'no-such-run'}' does not exist: give the directory `fisherkd train` made "
        "(output_dir/name)"
    ]
    done = subprocess.run(run, capture_output=True, text=True, env={**env, "FISHERKD_DEBUG": "1"})
    assert done.returncode == 1 and "Traceback" in done.stderr and "ConfigError" in done.stderr
