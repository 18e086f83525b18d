"""DisWOT validation: the rank correlation between the training-free score and the accuracy students reach by KD.

    python benchmarks/diswot_validation.py [--smoke] [--dry-run]

Reads ``benchmarks/configs/diswot_validation.yaml``: a run config (MNIST-1D, the cnn1d teacher, the KD recipe of
the accuracy tables) plus ``diswot`` (scoring settings), ``students`` (MLP hidden widths) and ``seeds``. For every
student it measures

- the DisWOT score (``fisherkd.search``: −(M_s + M_r), semantic and relation distances to the trained teacher at
  the student's random init), once per init seed, on that many seeded training batches; the table ranks by the
  mean; the same score against the teacher's architecture at a random init (the paper's abstract scores
  random-initialised pairs) is reported beside it;
- the test accuracy it reaches by KD (``fisherkd.run.train``), once per seed;

then Spearman's ρ and Kendall's τ-b between each score and the mean accuracy (p-values from scipy), with the
parameter count as the naive baseline a training-free score has to beat. Writes ``results.json`` (with device,
versions and commit) and ``results.md`` to ``benchmarks/results/diswot_validation/``.

``--smoke``: the teacher for 2 epochs, every student for 1 epoch and 1 seed, results under
``runs/diswot_validation_smoke/``; it also estimates how long the full run takes on this machine (1 thread).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parent
CONFIG = ROOT / "configs" / "diswot_validation.yaml"
EXTRA = ("diswot", "students", "seeds")


def run_config(raw: dict[str, Any], hidden: list[int], seed: int) -> dict[str, Any]:
    """The run config of one student and seed (the teacher, its seed and recipe are shared)."""
    config = copy.deepcopy({k: v for k, v in raw.items() if k not in EXTRA})
    config["name"] = f"{raw['name']}_mlp{'x'.join(map(str, hidden))}_seed{seed}"
    config["seed"] = seed
    config["student"] = {"name": "mlp", "kwargs": {"hidden": list(hidden)}}
    return config


def smoke_settings(raw: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    raw["teacher"]["train"]["epochs"] = 2
    raw["train"]["epochs"] = 1
    raw["seeds"] = 1
    raw["output_dir"] = "runs/diswot_validation_smoke/runs"
    return raw


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def scores(raw: dict[str, Any], teacher: torch.nn.Module, splits: Any) -> dict[str, dict[str, list[float]]]:
    """Per student label: its DisWOT distances and scores, one per init seed, against the trained teacher and
    against the teacher's architecture at a random init."""
    from fisherkd.models import create_model
    from fisherkd.search import Scorer, diswot_score, score_batches

    settings = raw["diswot"]
    teacher_name = raw["teacher"]["name"]
    out: dict[str, dict[str, list[float]]] = {}
    for init in settings["init_seeds"]:
        batches = score_batches(splits, settings["batches"], settings["batch_size"], seed=init)
        with torch.random.fork_rng():
            torch.manual_seed(10_000 + init)
            random_teacher = create_model(teacher_name, splits.in_channels, splits.num_classes).eval()
        fixed = {"mlp": {"in_features": splits.input_shape[-1]}}
        trained = Scorer(teacher, batches, splits.in_channels, splits.num_classes, fixed, seed=init)
        untrained = Scorer(random_teacher, batches, splits.in_channels, splits.num_classes, fixed, seed=init)
        for hidden in raw["students"]:
            row = out.setdefault(label(hidden), {"semantic": [], "relation": [], "score": [], "score_random": []})
            semantic, relation = trained.score("mlp", {"hidden": list(hidden)})
            row["semantic"].append(semantic)
            row["relation"].append(relation)
            row["score"].append(diswot_score(semantic, relation))
            row["score_random"].append(diswot_score(*untrained.score("mlp", {"hidden": list(hidden)})))
    return out


def label(hidden: list[int]) -> str:
    return "mlp " + "-".join(map(str, hidden))


def markdown(result: dict[str, Any]) -> str:
    rows = sorted(result["students"], key=lambda r: -r["score_mean"])
    lines = [
        f"# DisWOT validation ({'smoke run, not a result' if result['smoke'] else 'MNIST-1D'})",
        "",
        f"Teacher {result['teacher']['name']} (test accuracy {100 * result['teacher']['test_accuracy']:.2f}%); "
        f"students trained by KD, {result['seeds']} seed(s) each; DisWOT score = −(M_s + M_r) at random init, "
        f"mean over {len(result['diswot']['init_seeds'])} inits. Device: {result['provenance']['device']}, "
        f"torch {result['provenance']['torch']}, commit {result['provenance']['commit']}.",
        "",
        "| rank by score | student | params | DisWOT score | M_s | M_r | score, random teacher | KD test acc. (%) "
        "| rank by acc. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_acc = {r["student"]: i for i, r in enumerate(sorted(result["students"], key=lambda r: -r["accuracy_mean"]), 1)}
    for i, r in enumerate(rows, 1):
        lines.append(
            f"| {i} | {r['student']} | {r['params']:,} | {r['score_mean']:.5f} ± {r['score_std']:.5f} "
            f"| {statistics.mean(r['semantic']):.5f} | {statistics.mean(r['relation']):.5f} "
            f"| {r['score_random_mean']:.5f} | {r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f} "
            f"| {by_acc[r['student']]} |"
        )
    lines += ["", f"Rank correlation with the mean KD accuracy (n = {len(rows)} students):", "",
              "| predictor | Spearman ρ | p | Kendall τ-b | p |", "|---|---|---|---|---|"]
    for name, c in result["correlation"].items():
        lines.append(f"| {name} | {c['spearman']:.3f} | {c.get('spearman_p', float('nan')):.3g} "
                     f"| {c['kendall']:.3f} | {c.get('kendall_p', float('nan')):.3g} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few epochs, one seed: checks the script and times it")
    parser.add_argument("--dry-run", action="store_true", help="validate every run's config, train nothing")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the estimate and the runs are for one core
    from fisherkd.config import build_config

    raw = yaml.safe_load(CONFIG.read_text())
    if args.smoke:
        raw = smoke_settings(raw)
    seeds = range(raw["seeds"])
    configs = {(label(h), s): build_config(run_config(raw, h, s)) for h in raw["students"] for s in seeds}
    if len(raw["students"]) < 8:
        raise SystemExit(f"the issue asks for >= 8 students, the config has {len(raw['students'])}")
    if args.dry_run:
        print(f"{len(configs)} runs validated: {len(raw['students'])} students × {raw['seeds']} seeds")
        return
    from fisherkd.data import load_splits
    from fisherkd.models import create_model
    from fisherkd.provenance import provenance
    from fisherkd.run import get_teacher, train
    from fisherkd.search import parameter_count, rank_correlation

    out = ROOT.parent / "runs" / "diswot_validation_smoke" if args.smoke else ROOT / "results" / "diswot_validation"
    out.mkdir(parents=True, exist_ok=True)
    measured_with = provenance("cpu")  # before the runs: the code they import is the code of this commit
    started = time.perf_counter()
    first = next(iter(configs.values()))
    splits = load_splits(first.data)
    teacher, teacher_record = get_teacher(first, splits)  # trained and cached once; every run reuses it
    teacher.eval()
    teacher_seconds = time.perf_counter() - started
    score_started = time.perf_counter()
    measured = scores(raw, teacher, splits)
    score_seconds = time.perf_counter() - score_started
    students, walls = [], {}
    for hidden in raw["students"]:
        name = label(hidden)
        accuracy, train_seconds = [], []
        for seed in seeds:
            run_started = time.perf_counter()
            summary = train(configs[name, seed], splits=splits)
            walls[name, seed] = time.perf_counter() - run_started
            accuracy.append(100 * summary["test_accuracy"])
            train_seconds.append(summary["train_seconds"])
        m = measured[name]
        model = create_model("mlp", splits.in_channels, splits.num_classes, hidden=tuple(hidden))
        acc_mean, acc_std = mean_std(accuracy)
        score_mean, score_std = mean_std(m["score"])
        students.append({
            "student": name, "hidden": hidden, "params": parameter_count(model), **m,
            "score_mean": score_mean, "score_std": score_std, "score_random_mean": statistics.mean(m["score_random"]),
            "accuracy": accuracy, "accuracy_mean": acc_mean, "accuracy_std": acc_std, "train_seconds": train_seconds,
        })
    acc = [r["accuracy_mean"] for r in students]
    predictors = {
        "DisWOT score (trained teacher)": [r["score_mean"] for r in students],
        "−M_s (semantic only)": [-statistics.mean(r["semantic"]) for r in students],
        "−M_r (relation only)": [-statistics.mean(r["relation"]) for r in students],
        "DisWOT score (random-init teacher)": [r["score_random_mean"] for r in students],
        "parameter count (baseline)": [float(r["params"]) for r in students],
    }
    result = {
        "benchmark": "diswot_validation", "smoke": args.smoke, "config": raw, "provenance": measured_with,
        "teacher": {"name": raw["teacher"]["name"], **teacher_record}, "seeds": raw["seeds"],
        "diswot": raw["diswot"], "students": students,
        "correlation": {name: rank_correlation(values, acc) for name, values in predictors.items()},
        "seconds": {"teacher": teacher_seconds, "scoring": score_seconds, "total": time.perf_counter() - started},
    }
    if args.smoke:
        result["full_run_estimate_seconds"] = estimate(raw, students, walls, teacher_record, score_seconds)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(markdown(result))
    print(markdown(result))
    if args.smoke:
        print(f"estimated full run on this machine (1 thread): {result['full_run_estimate_seconds'] / 60:.0f} min")
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


def estimate(raw: dict[str, Any], students: list[dict], walls: dict, teacher: dict, score_seconds: float) -> float:
    """Seconds the full configuration would take, from this smoke run: each student's training time per epoch
    times the full epochs and seeds, plus its per-run overhead (data, evaluation, plots); the teacher's epochs
    likewise (when it was trained now); the scoring as measured (it does not depend on epochs)."""
    full = yaml.safe_load(CONFIG.read_text())
    ratio = full["train"]["epochs"] / raw["train"]["epochs"]
    total = score_seconds
    for r in students:
        per_run = statistics.mean(r["train_seconds"])
        overhead = statistics.mean(w for (name, _), w in walls.items() if name == r["student"]) - per_run
        total += full["seeds"] * (per_run * ratio + overhead)
    if "train_seconds" in teacher:
        total += teacher["train_seconds"] * full["teacher"]["train"]["epochs"] / raw["teacher"]["train"]["epochs"]
    return total


if __name__ == "__main__":
    main()
