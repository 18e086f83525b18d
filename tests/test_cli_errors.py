"""Bad input through the CLI: every error is one line on stderr, ``error: ...``, exit status 2, never a traceback.

Each case builds its bad input under ``tmp_path`` (tiny npz datasets, tiny configs, copies of one tiny finished
run) and names a word the message must contain: the file, the key or the shapes at fault.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fisherkd.cli import main
from fisherkd.config import ConfigError


def write_npz(path: Path, n: int = 48, features: int = 40, **arrays: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((n, features)).astype(np.float32), "y": np.arange(n) % 3}
    np.savez(path, **{**data, **arrays})
    return path


def run_config(root: Path, out: Path, **changes) -> dict:
    config = {
        "name": "tiny",
        "device": "cpu",
        "output_dir": str(out),
        "data": {"name": "npz", "root": str(root)},
        "student": {"name": "mlp", "kwargs": {"hidden": [8]}},
        "train": {"epochs": 1, "batch_size": 16, "eval_batch_size": 64},
    }
    return {**config, **changes}


def write_yaml(path: Path, obj) -> Path:
    path.write_text(yaml.safe_dump(obj))
    return path


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FISHERKD_DEBUG", raising=False)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One tiny run trained for one epoch through the CLI: a run directory with config.yaml, last.pt and best.pt."""
    tmp = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FISHERKD_CACHE", str(tmp / "cache"))
        config = write_yaml(tmp / "c.yaml", run_config(write_npz(tmp / "data.npz"), tmp / "runs"))
        assert main(["train", str(config)]) == 0
    run_dir = tmp / "runs" / "tiny"
    assert (run_dir / "checkpoints" / "last.pt").exists() and (run_dir / "checkpoints" / "best.pt").exists()
    return run_dir


def copy_run(finished_run: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(finished_run, tmp / "copy"))


def edit_config(run_dir: Path, **student) -> None:
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["student"] |= student
    write_yaml(run_dir / "config.yaml", config)


def train_with(tmp: Path, npz: Path | None = None, overrides: tuple[str, ...] = (), **changes) -> list[str]:
    npz = npz or write_npz(tmp / "data.npz")
    return ["train", str(write_yaml(tmp / "c.yaml", run_config(npz, tmp / "runs", **changes))), *overrides]


def text_file(tmp: Path, name: str, text: str) -> Path:
    (tmp / name).write_text(text)
    return tmp / name


def bytes_file(tmp: Path, name: str, data: bytes) -> Path:
    (tmp / name).write_bytes(data)
    return tmp / name


def truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# -- train: the config file and its overrides -------------------------------------------------------------------
def case_config_missing(tmp, run):
    return ["train", str(tmp / "nope.yaml")], "nope.yaml"


def case_config_is_a_directory(tmp, run):
    (tmp / "conf.d").mkdir()
    return ["train", str(tmp / "conf.d")], "conf.d"


def case_yaml_python_tag(tmp, run):
    path = text_file(tmp, "evil.yaml", "student: !!python/object/apply:os.system ['echo pwned']\n")
    return ["train", str(path)], "evil.yaml"


def case_yaml_malformed(tmp, run):
    return ["train", str(text_file(tmp, "broken.yaml", "student: {name: mlp\nmethods: [\n"))], "broken.yaml"


def case_yaml_tab_indent(tmp, run):
    return ["train", str(text_file(tmp, "tabs.yaml", "student:\n\tname: mlp\n"))], "tabs.yaml"


def case_yaml_not_a_mapping(tmp, run):
    return ["train", str(text_file(tmp, "list.yaml", "- student\n- mlp\n"))], "mapping"


def case_yaml_empty(tmp, run):
    return ["train", str(text_file(tmp, "empty.yaml", ""))], "empty"


def case_override_not_an_int(tmp, run):
    return train_with(tmp, overrides=("train.epochs=abc",)), "train.epochs"


def case_override_without_equals(tmp, run):
    return train_with(tmp, overrides=("nokey",)), "nokey"


def case_override_bad_index(tmp, run):
    return train_with(tmp, overrides=("methods.7.weight=1",), methods=[{"name": "ce"}]), "methods.7"


def case_override_malformed_yaml_value(tmp, run):
    return train_with(tmp, overrides=("methods=[{name: kd",)), "methods"


def case_unknown_method(tmp, run):
    return train_with(tmp, methods=[{"name": "kdd"}]), "kdd"


def case_unknown_model(tmp, run):
    return train_with(tmp, student={"name": "mlpp"}), "mlpp"


def case_unknown_model_kwarg(tmp, run):
    return train_with(tmp, student={"name": "mlp", "kwargs": {"hiden": [8]}}), "hiden"


def case_unknown_dataset(tmp, run):
    return train_with(tmp, data={"name": "npzz"}), "npzz"


# -- train: the data ----------------------------------------------------------------------------------------------
def case_npz_missing(tmp, run):
    return train_with(tmp, npz=tmp / "nope.npz"), "nope.npz"


def case_npz_is_a_directory(tmp, run):
    (tmp / "data.npz").mkdir()
    return train_with(tmp, npz=tmp / "data.npz"), "data.npz"


def case_npz_not_an_npz(tmp, run):
    return train_with(tmp, npz=bytes_file(tmp, "junk.npz", b"not a zip file at all")), "junk.npz"


def case_npz_truncated(tmp, run):
    return train_with(tmp, npz=truncated(write_npz(tmp / "cut.npz"))), "cut.npz"


def case_npz_x_of_rank_1(tmp, run):
    return train_with(tmp, npz=write_npz(tmp / "d.npz", x=np.zeros(48, np.float32))), "(48,)"


def case_npz_x_does_not_fit_the_model(tmp, run):
    return train_with(tmp, npz=write_npz(tmp / "d.npz", features=7)), "(7,)"


def case_npz_labels_float(tmp, run):
    return train_with(tmp, npz=write_npz(tmp / "d.npz", y=np.full(48, 0.5))), "integer"


def case_npz_labels_strings(tmp, run):
    return train_with(tmp, npz=write_npz(tmp / "d.npz", y=np.array(["a", "b", "c"] * 16))), "integer"


def case_npz_x_strings(tmp, run):
    return train_with(tmp, npz=write_npz(tmp / "d.npz", x=np.array([["a"] * 40] * 48))), "x"


def case_npz_x_with_nan(tmp, run):
    x = np.zeros((48, 40), np.float32)
    x[5, 3] = np.nan
    return train_with(tmp, npz=write_npz(tmp / "d.npz", x=x)), "row 5"


def case_training_diverges(tmp, run):
    return train_with(tmp, overrides=("train.optimizer.lr=1e30",)), "diverged"


def case_npz_without_y(tmp, run):
    np.savez(tmp / "d.npz", x=np.zeros((48, 40), np.float32))
    return train_with(tmp, npz=tmp / "d.npz"), "'y'"


def case_npz_empty_train_split(tmp, run):
    empty = {"x": np.zeros((0, 40), np.float32), "y": np.zeros(0, np.int64)}
    test = {"x_test": np.zeros((8, 40), np.float32), "y_test": np.arange(8) % 3}
    return train_with(tmp, npz=write_npz(tmp / "d.npz", **empty, **test)), "0 training samples"


def case_npz_empty_test_split(tmp, run):
    test = {"x_test": np.zeros((0, 40), np.float32), "y_test": np.zeros(0, np.int64)}
    return train_with(tmp, npz=write_npz(tmp / "d.npz", **test)), "0 test samples"


def case_feature_pair_of_incompatible_shapes(tmp, run):
    teacher = {"name": "cnn1d", "train": {"epochs": 1, "batch_size": 16}}
    methods = [{"name": "ce"}, {"name": "fitnet", "pairs": [["features.1", "features.1"]]}]
    return train_with(tmp, teacher=teacher, methods=methods), "features.1"


def case_student_checkpoint_missing(tmp, run):
    return train_with(tmp, student={"name": "mlp", "checkpoint": str(tmp / "w.pt")}), "w.pt"


def case_student_checkpoint_corrupt(tmp, run):
    weights = bytes_file(tmp, "w.pt", b"\x80\x04garbage")
    return train_with(tmp, student={"name": "mlp", "checkpoint": str(weights)}), "w.pt"


def case_student_checkpoint_of_another_model(tmp, run):
    return train_with(tmp, student={"name": "mlp", "checkpoint": str(run)}), "(100, 40)"


def case_resume_corrupt_checkpoint(tmp, run):
    run_dir = copy_run(run, tmp)
    truncated(run_dir / "checkpoints" / "last.pt")
    return [*train_with(tmp), "--resume", str(run_dir)], "last.pt"


def case_resume_without_checkpoint(tmp, run):
    (tmp / "fresh").mkdir()
    return [*train_with(tmp), "--resume", str(tmp / "fresh")], "last.pt"


def case_resume_run_dir_missing(tmp, run):
    return [*train_with(tmp), "--resume", str(tmp / "no-such-run")], "no-such-run"


def case_resume_checkpoint_of_another_model(tmp, run):
    run_dir = copy_run(run, tmp)
    return [*train_with(tmp, student={"name": "mlp", "kwargs": {"hidden": [16]}}), "--resume", str(run_dir)], "(16, 40)"


# -- eval and report: the run directory and its checkpoints -----------------------------------------------------
def case_eval_run_dir_missing(tmp, run):
    return ["eval", str(tmp / "no-such-run")], "no-such-run"


def case_eval_run_dir_is_a_file(tmp, run):
    return ["eval", str(text_file(tmp, "notes.txt", "hello"))], "notes.txt"


def case_eval_run_dir_without_config(tmp, run):
    (tmp / "bare").mkdir()
    return ["eval", str(tmp / "bare")], "config.yaml"


def case_eval_config_yaml_corrupt(tmp, run):
    run_dir = copy_run(run, tmp)
    (run_dir / "config.yaml").write_text("student: [\n")
    return ["eval", str(run_dir)], "config.yaml"


def case_eval_config_yaml_invalid(tmp, run):
    run_dir = copy_run(run, tmp)
    edit_config(run_dir, nmae="mlp")
    return ["eval", str(run_dir)], "student.nmae"


def case_eval_truncated_checkpoint(tmp, run):
    run_dir = copy_run(run, tmp)
    truncated(run_dir / "checkpoints" / "last.pt")
    return ["eval", str(run_dir)], "last.pt"


def case_eval_empty_checkpoint(tmp, run):
    run_dir = copy_run(run, tmp)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"")
    return ["eval", str(run_dir)], "last.pt"


def case_eval_garbage_checkpoint(tmp, run):
    run_dir = copy_run(run, tmp)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"\x80\x02}q\x00garbage" * 10)
    return ["eval", str(run_dir)], "last.pt"


def case_eval_checkpoint_is_a_directory(tmp, run):
    run_dir = copy_run(run, tmp)
    (run_dir / "checkpoints" / "last.pt").unlink()
    (run_dir / "checkpoints" / "last.pt").mkdir()
    return ["eval", str(run_dir)], "last.pt"


def case_eval_checkpoint_with_python_objects(tmp, run):
    run_dir = copy_run(run, tmp)
    torch.save({"distiller": torch.nn.Linear(2, 2)}, run_dir / "checkpoints" / "last.pt")
    return ["eval", str(run_dir)], "last.pt"


def case_eval_plain_state_dict(tmp, run):
    run_dir = copy_run(run, tmp)
    torch.save(torch.nn.Linear(40, 3).state_dict(), run_dir / "checkpoints" / "last.pt")
    return ["eval", str(run_dir)], "'distiller'"


def case_eval_checkpoint_not_a_dict(tmp, run):
    run_dir = copy_run(run, tmp)
    torch.save([torch.zeros(2)], run_dir / "checkpoints" / "last.pt")
    return ["eval", str(run_dir)], "last.pt"


def case_eval_checkpoint_of_other_shapes(tmp, run):
    run_dir = copy_run(run, tmp)
    edit_config(run_dir, kwargs={"hidden": [16]})
    return ["eval", str(run_dir)], "(16, 40)"


def case_eval_checkpoint_of_another_model(tmp, run):
    run_dir = copy_run(run, tmp)
    edit_config(run_dir, name="cnn1d", kwargs={})
    return ["eval", str(run_dir)], "(3, 125)"  # the heads differ


def case_eval_best_checkpoint_missing(tmp, run):
    run_dir = copy_run(run, tmp)
    (run_dir / "checkpoints" / "best.pt").unlink()
    return ["eval", str(run_dir), "--checkpoint", "best"], "best.pt"


def case_eval_unknown_checkpoint_name(tmp, run):
    return ["eval", str(run), "--checkpoint", "bset"], "bset"


def case_eval_data_gone(tmp, run):
    run_dir = copy_run(run, tmp)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["data"]["root"] = str(tmp / "moved.npz")
    write_yaml(run_dir / "config.yaml", config)
    return ["eval", str(run_dir)], "moved.npz"


def case_report_run_dir_missing(tmp, run):
    return ["report", str(tmp / "no-such-run")], "no-such-run"


def case_report_run_dir_without_config(tmp, run):
    (tmp / "bare").mkdir()
    return ["report", str(tmp / "bare")], "config.yaml"


def case_report_truncated_checkpoint(tmp, run):
    run_dir = copy_run(run, tmp)
    truncated(run_dir / "checkpoints" / "last.pt")
    return ["report", str(run_dir)], "last.pt"


def case_report_samples_zero(tmp, run):
    return ["report", str(run), "--samples", "0"], "--samples"


# -- compare, demo, methods ---------------------------------------------------------------------------------------
def case_compare_file_missing(tmp, run):
    return ["compare", str(tmp / "grid.yaml")], "grid.yaml"


def case_compare_yaml_malformed(tmp, run):
    return ["compare", str(text_file(tmp, "grid.yaml", "variants: {a: [\n"))], "grid.yaml"


def case_compare_yaml_python_tag(tmp, run):
    return ["compare", str(text_file(tmp, "grid.yaml", "x: !!python/name:os.system\n"))], "grid.yaml"


def case_compare_not_a_mapping(tmp, run):
    return ["compare", str(text_file(tmp, "grid.yaml", "- a\n"))], "mapping"


def compare_file(tmp: Path, **extra) -> Path:
    return write_yaml(tmp / "grid.yaml", {**run_config(write_npz(tmp / "data.npz"), tmp / "runs"), **extra})


def case_compare_variants_not_a_mapping(tmp, run):
    return ["compare", str(compare_file(tmp, variants=["a", "b"])), "--output", str(tmp / "o")], "variants"


def case_compare_variant_not_a_mapping(tmp, run):
    grid = compare_file(tmp, variants={"a": "kd"})
    return ["compare", str(grid), "--output", str(tmp / "o")], "'a'"


def case_compare_unknown_method(tmp, run):
    return ["compare", str(compare_file(tmp)), "--methods", "kdd", "--output", str(tmp / "o")], "kdd"


def case_compare_zero_seeds(tmp, run):
    return ["compare", str(compare_file(tmp)), "--methods", "ce", "--seeds", "0"], "--seeds"


def case_compare_output_is_a_file(tmp, run):
    output = text_file(tmp, "out.txt", "")
    return ["compare", str(compare_file(tmp)), "--methods", "ce", "--seeds", "1", "--output", str(output)], "out.txt"


def case_demo_bad_override(tmp, run):
    return ["demo", "--output", str(tmp / "demo"), "train.epochs=abc"], "train.epochs"


def case_demo_zero_seeds(tmp, run):
    return ["demo", "--output", str(tmp / "demo"), "--seeds", "0"], "--seeds"


def case_methods_unknown_family(tmp, run):
    return ["methods", "--family", "logitt"], "logitt"


def case_unknown_command(tmp, run):
    return ["trian"], "trian"


CASES: dict[str, Callable[[Path, Path], tuple[list[str], str]]] = {
    name.removeprefix("case_"): fn for name, fn in dict(globals()).items() if name.startswith("case_")
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2(case, tmp_path, finished_run, capsys):
    argv, keyword = CASES[case](tmp_path, finished_run)
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and len(lines[0]) > len("error: ") + 10, err
    assert keyword in lines[0], err


def test_resume_of_a_missing_run_writes_nothing(tmp_path):
    assert main([*train_with(tmp_path), "--resume", str(tmp_path / "typo")]) == 2
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (RuntimeError(), "error: RuntimeError"),  # no message: the type says what happened
        (KeyError("unknown thing 'x'"), "error: unknown thing 'x'"),  # without the quotes str(KeyError) adds
        (OSError(28, "No space left on device"), "error: [Errno 28] No space left on device"),  # not "error: 28"
        (AttributeError("'NoneType' object has no attribute 'x'"), "(AttributeError, an internal error: FISHERKD"),
    ],
)
def test_any_exception_is_one_informative_line(raised, expected, tmp_path, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr("fisherkd.run.train", fail)
    assert main(train_with(tmp_path)) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and expected in lines[0], lines


def test_debug_keeps_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("FISHERKD_DEBUG", "1")
    path = text_file(tmp_path, "evil.yaml", "student: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError) as err:
        main(["train", str(path)])
    assert isinstance(err.value.__cause__, yaml.YAMLError)  # the parser's own error stays in the chain


def test_the_finished_run_still_evaluates(finished_run, capsys):
    assert main(["eval", str(finished_run)]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1.0


def test_load_weights_refuses_another_model_and_fills_lazy_buffers():
    from fisherkd.engine.checkpoint import load_weights
    from fisherkd.errors import CheckpointError
    from fisherkd.fisher.state import EMAStatistic

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 2)
            self.ema = EMAStatistic(0.9)  # its buffer is sized by the first update, or by a checkpoint

    trained = Model()
    trained.ema.update(torch.full((3,), 7.0))
    saved = trained.state_dict()
    model = Model()
    load_weights(model, saved, "m.pt", "model")
    assert torch.equal(model.layer.weight, trained.layer.weight) and torch.equal(model.ema.value, trained.ema.value)

    without_ema = {k: v for k, v in saved.items() if not k.startswith("ema.")}
    missing = r"'m.pt' does not fit the model: 2 of its weights are missing from the file \(e.g. \['ema.value', 'ema"
    with pytest.raises(CheckpointError, match=missing):
        load_weights(Model(), without_ema, "m.pt", "model")
    load_weights(Model(), without_ema, "m.pt", "model", optional=("ema.",))
    with pytest.raises(CheckpointError, match=r"1 in the file are unknown to it \(e.g. \['extra'\]\)"):
        load_weights(Model(), {**saved, "extra": torch.zeros(1)}, "m.pt", "model")
    with pytest.raises(CheckpointError, match=r"'layer.weight' is \(2, 5\) in the file but \(2, 4\) in the model"):
        load_weights(Model(), {**saved, "layer.weight": torch.ones(2, 5)}, "m.pt", "model")
