"""``fisherkd export``: every format of an MLP, a small CNN and a small ViT student, each checked against the
student rebuilt independently from the run's checkpoint; the demo layout; a Hugging Face student; the errors."""

from __future__ import annotations

import builtins
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fisherkd.cli import main
from fisherkd.config import RunConfig
from fisherkd.data import load_splits
from fisherkd.export import (
    ATOL,
    ONNX_MISSING,
    ExportError,
    export_run,
    parse_formats,
    resolve_run_dir,
    verify_logits,
)
from fisherkd.models import load_student
from fisherkd.run import build_student, rebuild_distiller, train
from fisherkd.schemes import load_student_weights

TEACHER_TRAIN = {"epochs": 1, "batch_size": 32}
CASES = {
    # a dual-head MLP student with Fisher-weighted KD (Fisher state in the checkpoint)
    "mlp": {
        "shape": (40,),
        "teacher": {"name": "cnn1d", "train": TEACHER_TRAIN},
        "student": {"name": "mlp", "dual_head": "head"},
        "methods": [
            {"name": "ce", "weight": 0.1},
            {"name": "kd", "weight": 0.9, "fisher": {"axis": "sample"}},
            {"name": "dual_head", "loss": "kd", "pairs": [["head.distill", ""]]},
        ],
    },
    # a CNN student whose FitNet hint has an adapter (adapter weights in the checkpoint)
    "cnn": {
        "shape": (1, 12, 12),
        "teacher": {"name": "cnn_small", "train": TEACHER_TRAIN},
        "student": {"name": "cnn_small", "kwargs": {"head": "gap"}},
        "methods": [{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9},
                    {"name": "fitnet", "pairs": [["features", "features"]]}],
    },
    "vit": {
        "shape": (3, 8, 8),
        "teacher": {"name": "cnn_small", "train": TEACHER_TRAIN},
        "student": {"name": "vit_tiny", "kwargs": {"image_size": 8, "patch_size": 4, "dim": 16, "depth": 1,
                                                   "heads": 2}},
        "methods": [{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9}],
    },
}
# Runs exported differently from the student alone: SimKD predicts through a projector and the teacher's classifier.
PREDICTOR_CASES = {
    "simkd": {
        "shape": (1, 12, 12),
        "teacher": {"name": "cnn_small", "kwargs": {"head": "gap"}, "train": TEACHER_TRAIN},
        "student": {"name": "cnn_small", "kwargs": {"head": "gap"}},
        "methods": [{"name": "simkd", "pairs": [["layer2", "layer2"]]}],
    },
}
FAST = {"speed_batch": 16, "speed_runs": 2}


def write_npz(path: Path, shape: tuple[int, ...], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(96, *shape)).astype("float32")
    flat = x.reshape(len(x), -1)
    half = flat.shape[1] // 2
    np.savez(path, x=x, y=(flat[:, :half].sum(1) > 0).astype("int64") + (flat[:, half:].sum(1) > 0))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One finished run per case (trained once for the module), and the teacher cache they share."""
    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FISHERKD_CACHE", str(root / "cache"))
        for case, spec in {**CASES, **PREDICTOR_CASES}.items():
            write_npz(root / f"{case}.npz", spec["shape"])
            config = {
                "name": case,
                "output_dir": str(root / "runs"),
                "data": {"name": "npz", "root": str(root / f"{case}.npz")},
                "train": {"epochs": 1, "batch_size": 32},
                **{k: v for k, v in spec.items() if k != "shape"},
            }
            train(RunConfig.model_validate(config), run_dir=root / "runs" / case)
    return root


@pytest.fixture
def cache(runs, monkeypatch):
    monkeypatch.setenv("FISHERKD_CACHE", str(runs / "cache"))
    return runs / "cache"


def independent_student(run_dir: Path, checkpoint: str = "last") -> torch.nn.Module:
    """The run's student as the training code builds it, with the checkpoint's student weights."""
    config = RunConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    student = build_student(config.student, load_splits(config.data))
    student.load_state_dict(load_student_weights(run_dir, checkpoint))
    return student.eval()


def held_out_inputs(run_dir: Path, n: int = 5) -> torch.Tensor:
    config = RunConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    return load_splits(config.data).test.x[:n]  # 5: neither the batch of 2 it was traced at nor the verify batch


@pytest.mark.parametrize("case", list(CASES))
def test_every_format_reproduces_the_run_student(case, runs, cache, tmp_path):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    run_dir, out = runs / "runs" / case, tmp_path / "export"
    manifest = export_run(run_dir, out, **FAST)
    student, x = independent_student(run_dir), held_out_inputs(run_dir)
    with torch.no_grad():
        expected = student(x)

    # safetensors: the student's weights alone (no adapters, methods, Fisher state or teacher), rebuilt in one call
    from safetensors.torch import load_file

    assert set(load_file(str(out / "model.safetensors"))) == set(student.state_dict())
    loaded = load_student(out)
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)

    # ONNX: a valid graph with a dynamic batch axis, run by ONNX Runtime at another batch size than exported at
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=ATOL)

    traced = torch.jit.load(str(out / "model.torchscript.pt"))
    torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-6)

    # verified against the run's own record, for every format
    recorded = json.loads((run_dir / "summary.json").read_text())["test_accuracy"]
    assert set(manifest["verification"]) == {"pytorch", "safetensors", "onnx", "torchscript"}
    assert all(row["test_accuracy"] == pytest.approx(recorded) for row in manifest["verification"].values())
    assert json.loads((out / "export.json").read_text())["files"]["onnx"] == "model.onnx"


def test_dual_head_student_is_rebuilt_with_both_heads_and_its_inference_mode(runs, cache, tmp_path):
    export_run(runs / "runs" / "mlp", tmp_path, formats="safetensors", **FAST)
    spec = json.loads((tmp_path / "student.json").read_text())
    assert spec["dual_head"] == {"head": "head", "inference": "mean"}
    model, x = load_student(tmp_path), held_out_inputs(runs / "runs" / "mlp")
    with torch.no_grad():  # eval output of a DeiT-style dual head: the mean of its two (different) heads
        features = model.features(x)
        label, distill = model.head.label(features), model.head.distill(features)
        assert not torch.allclose(label, distill)
        torch.testing.assert_close(model(x), (label + distill) / 2)


def test_model_card_has_front_matter_metrics_speed_and_plots(runs, cache, tmp_path):
    manifest = export_run(runs / "runs" / "cnn", tmp_path, formats="safetensors", **FAST)
    card = (tmp_path / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["datasets"] == ["npz"] and "knowledge-distillation" in meta["tags"]
    accuracy = meta["model-index"][0]["results"][0]["metrics"][0]["value"]
    assert accuracy == pytest.approx(manifest["metrics"]["accuracy"], abs=1e-6)
    for text in ("teacher", "KL(teacher", "error inheritance", "ECE", "`fitnet` × 1", "features → features",
                 manifest["speed"]["device"], "latency, batch 1", "throughput", "plots/curves.png"):
        assert text in body, text
    assert (tmp_path / "plots" / "curves.png").exists()
    speed = manifest["speed"]["models"]
    assert set(speed) == {"student", "teacher"} and all(row["latency_ms_batch1"] > 0 for row in speed.values())
    teacher, student = manifest["teacher"], manifest["student"]
    assert student["bytes"] == (tmp_path / "model.safetensors").stat().st_size
    assert student["parameters"] == sum(p.numel() for p in load_student(tmp_path).parameters())
    assert teacher["name"] == "cnn_small" and teacher["parameters"] > 0


def test_fidelity_metrics_match_a_direct_computation(runs, cache, tmp_path):
    """Agreement and accuracy in the card, recomputed by hand from the exported student and the cached teacher."""
    run_dir = runs / "runs" / "vit"
    manifest = export_run(run_dir, tmp_path, formats="safetensors", **FAST)
    config = RunConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    splits = load_splits(config.data)
    from fisherkd.run import get_teacher

    teacher = get_teacher(config, splits)[0].eval()
    with torch.no_grad():
        s, t = load_student(tmp_path)(splits.test.x), teacher(splits.test.x)
    agree = sum(int(a == b) for a, b in zip(s.argmax(1).tolist(), t.argmax(1).tolist())) / len(s)
    right = sum(int(a == b) for a, b in zip(s.argmax(1).tolist(), splits.test.y.tolist())) / len(s)
    assert manifest["metrics"]["agreement"] == pytest.approx(agree)
    assert manifest["metrics"]["accuracy"] == pytest.approx(right)


def test_a_run_without_its_teacher_here_is_exported_without_retraining_it(runs, monkeypatch, tmp_path):
    empty = tmp_path / "empty-cache"
    monkeypatch.setenv("FISHERKD_CACHE", str(empty))
    manifest = export_run(runs / "runs" / "mlp", tmp_path / "out", formats="safetensors", **FAST)
    assert manifest["teacher"] is None and "not in the teacher cache" in manifest["missing_teacher"]
    assert not (empty / "teachers").exists() or not any((empty / "teachers").iterdir())
    assert set(manifest["speed"]["models"]) == {"student"}
    assert "No teacher rows below" in (tmp_path / "out" / "README.md").read_text()


def test_demo_folder_exports_its_most_accurate_run(runs, cache, tmp_path, capsys):
    demo = tmp_path / "demo"
    shutil.copytree(runs / "runs" / "mlp", demo / "runs" / "kd-seed0")
    worse = demo / "runs" / "scratch-seed0"
    shutil.copytree(runs / "runs" / "mlp", worse)
    summary = json.loads((worse / "summary.json").read_text())
    (worse / "summary.json").write_text(json.dumps({**summary, "test_accuracy": summary["test_accuracy"] - 0.1}))
    assert resolve_run_dir(demo) == demo / "runs" / "kd-seed0"
    assert main(["export", str(demo), "--format", "safetensors", "--output", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "export.json").read_text())["run_dir"] == str(demo / "runs" / "kd-seed0")
    assert f"exported {demo / 'runs' / 'kd-seed0'} (last.pt) to {tmp_path / 'out'}" in capsys.readouterr().out


def test_a_folder_of_runs_is_ranked_by_the_chosen_checkpoint(tmp_path):
    for name, last, best in [("a", 0.6, 0.9), ("b", 0.7, 0.7)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("{}")
        (tmp_path / name / "summary.json").write_text(json.dumps({"test_accuracy": last, "best_test_accuracy": best}))
    assert resolve_run_dir(tmp_path, "last") == tmp_path / "b"
    assert resolve_run_dir(tmp_path, "best") == tmp_path / "a"


# ---------------------------------------------------------------------------------------------------- errors


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_unknown_run_is_a_one_line_error(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope")]) == 2
    assert one_line_error(capsys).startswith(f"error: run directory {str(tmp_path / 'nope')!r} does not exist; pass")


def test_missing_checkpoint_names_the_ones_there(runs, cache, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(runs / "runs" / "mlp", run_dir)
    (run_dir / "checkpoints" / "best.pt").unlink()
    assert main(["export", str(run_dir), "--checkpoint", "best", "--format", "safetensors"]) == 2
    assert "has no checkpoints/best.pt (it has: last; pass --checkpoint last)" in one_line_error(capsys)


def test_onnx_without_its_packages_names_the_extra(runs, cache, monkeypatch, tmp_path, capsys):
    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name.split(".")[0] in ("onnx", "onnxruntime"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    out = tmp_path / "out"
    assert main(["export", str(runs / "runs" / "mlp"), "--format", "safetensors,onnx", "--output", str(out)]) == 2
    assert one_line_error(capsys) == f"error: {ONNX_MISSING}"
    assert ONNX_MISSING == "ONNX export needs onnx and onnxruntime: pip install 'fisherkd[export]'"
    assert not out.exists()  # refused before any work


def test_unknown_format_suggests_the_nearest():
    with pytest.raises(ValueError, match="unknown export format 'onxx'; did you mean: onnx"):
        parse_formats("safetensors,onxx")
    assert parse_formats("onnx, safetensors,onnx") == ["onnx", "safetensors"]


def test_verification_tolerance_is_atol_plus_rtol_times_the_logit():
    reference = torch.tensor([[1000.0, 0.0]])
    # 1e-4 + 1e-4·1000 = 0.1001 allowed on the large logit, 1e-4 on the zero one
    assert verify_logits("x", lambda _: torch.tensor([[1000.1, 0.00009]]), reference, reference) > 0.09
    with pytest.raises(ExportError, match=r"x export does not match PyTorch on 1 held-out test samples: max"):
        verify_logits("x", lambda _: torch.tensor([[1000.0, 0.0002]]), reference, reference)
    with pytest.raises(ExportError, match="exceeds atol 0.0001 \\+ rtol 0.0001"):
        verify_logits("x", lambda _: torch.tensor([[1000.2, 0.0]]), reference, reference)
    with pytest.raises(ExportError, match=r"returns shape \(1, 3\), PyTorch \(1, 2\)"):
        verify_logits("x", lambda _: torch.zeros(1, 3), reference, reference)


def test_a_checkpoint_that_disagrees_with_the_run_record_is_an_error(runs, cache, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs / "runs" / "cnn", run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "test_accuracy": summary["test_accuracy"] + 0.05}))
    with pytest.raises(ExportError, match="pytorch export has test accuracy .* the run recorded"):
        export_run(run_dir, tmp_path / "out", formats="safetensors", **FAST)


def test_an_unfinished_run_is_exported_and_says_it_has_no_record(runs, cache, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs / "runs" / "mlp", run_dir)
    (run_dir / "summary.json").unlink()
    manifest = export_run(run_dir, tmp_path / "out", formats="safetensors", **FAST)
    assert manifest["run_test_accuracy"] is None and set(manifest["verification"]) == {"pytorch", "safetensors"}
    assert "no recorded accuracy to compare with" in (tmp_path / "out" / "README.md").read_text()


def test_a_model_the_tracer_cannot_follow_skips_torchscript_only(runs, cache, monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise RuntimeError("data-dependent control flow\nmore detail")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    manifest = export_run(runs / "runs" / "mlp", tmp_path, formats="safetensors,torchscript", **FAST)
    assert manifest["skipped"] == {"torchscript": "RuntimeError: data-dependent control flow"}
    assert set(manifest["verification"]) == {"pytorch", "safetensors"}
    card = (tmp_path / "README.md").read_text()
    assert "Not exported: torchscript (RuntimeError: data-dependent control flow)." in card


def test_load_student_errors_say_what_the_folder_is(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no student.json: export a run into it first"):
        load_student(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="is a Hugging Face export: load it with transformers.AutoModel"):
        load_student(tmp_path)


# ---------------------------------------------------------------------------------------------------- Transformers


def test_hf_student_from_distillation_trainer_reloads_offline(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from fisherkd.export import export_hf
    from fisherkd.hf import DistillationConfig, DistillationTrainer

    words = [f"w{i}" for i in range(30)]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))

    def bert(layers: int, hidden: int) -> transformers.PreTrainedModel:
        config = transformers.BertConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
            intermediate_size=2 * hidden, max_position_embeddings=16, num_labels=3, attn_implementation="eager",
        )
        return transformers.BertForSequenceClassification(config)

    torch.manual_seed(0)
    teacher, student = bert(2, 16), bert(1, 8)
    g = torch.Generator().manual_seed(0)
    examples = [
        {"input_ids": torch.randint(5, len(tokenizer), (8,), generator=g), "attention_mask": torch.ones(8).long(),
         "labels": torch.tensor(i % 3)}
        for i in range(8)
    ]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "train"), max_steps=2, per_device_train_batch_size=4, report_to="none",
        use_cpu=True, save_strategy="no", disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, distillation=DistillationConfig(methods=["kd", "ce"]), args=args,
        train_dataset=examples, processing_class=tokenizer, data_collator=transformers.default_data_collator,
    )
    trainer.train()
    out = tmp_path / "export"
    batch = tokenizer(["w1 w2 w3", "w4 w5"], padding=True, return_tensors="pt")
    manifest = export_hf(trainer, out, example=dict(batch), speed_runs=2)

    assert (out / "model.safetensors").exists() and not (out / "pytorch_model.bin").exists()
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, student(**batch).logits)
    again = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert again("w1 w2 w3")["input_ids"] == tokenizer("w1 w2 w3")["input_ids"]
    assert manifest["teacher"]["parameters"] > manifest["student"]["parameters"]
    card = (out / "README.md").read_text()
    assert yaml.safe_load(card.split("---\n")[1])["library_name"] == "transformers"
    assert "- `kd`" in card and "latency, batch 1" in card


def test_the_readme_one_liner_exports_a_demo_folder(runs, cache, tmp_path, monkeypatch):
    """The command the README gives for `make demo`'s output, run on a folder laid out as the demo writes it."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Export a student") :]
    command = re.search(r"```bash\n(.*?)\n```", section, re.S).group(1).strip()
    assert command == ".venv/bin/fisherkd export runs/demo"
    shutil.copytree(runs / "runs" / "mlp", tmp_path / "runs" / "demo" / "runs" / "kd-seed0")
    monkeypatch.chdir(tmp_path)
    assert main([*command.split()[1:], "--format", "safetensors,torchscript"]) == 0
    exported = tmp_path / "runs" / "demo" / "runs" / "kd-seed0" / "export"
    assert (exported / "README.md").exists() and load_student(exported) is not None


def test_a_student_that_predicts_through_the_teacher_classifier_is_exported_as_one_module(runs, cache, tmp_path):
    pytest.importorskip("onnxruntime")
    from fisherkd.methods.head import TeacherHeadPredictor

    run_dir, out = runs / "runs" / "simkd", tmp_path / "export"
    manifest = export_run(run_dir, out, **FAST)
    config = RunConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    distiller = rebuild_distiller(run_dir, config, load_splits(config.data))
    reference = distiller.inference_model().eval()  # what the engine evaluated: student → projector → teacher head
    assert isinstance(reference, TeacherHeadPredictor)
    x = held_out_inputs(run_dir)
    loaded = load_student(out)
    assert isinstance(loaded, TeacherHeadPredictor) and not loaded.training
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
        # the teacher's classifier travels with it: the exported one is the teacher's, not the student's own head
        torch.testing.assert_close(loaded.classifier.weight, distiller.teacher.head.weight)
    assert not torch.allclose(loaded.classifier.weight[:, : loaded.student.head.weight.shape[1]],
                              loaded.student.head.weight)
    recorded = json.loads((run_dir / "summary.json").read_text())["test_accuracy"]
    assert set(manifest["verification"]) == {"pytorch", "safetensors", "onnx", "torchscript"}
    assert all(row["test_accuracy"] == pytest.approx(recorded) for row in manifest["verification"].values())

