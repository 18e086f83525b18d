"""``fisherkd compare``: one teacher, several student recipes, several seeds → a table, a CSV and a plot.

A compare file is a run config plus ``variants`` (named recipes, each laid over the base config: ``methods``, a
``train`` knob, another ``teacher``…) and/or, with ``--methods a,b,c``, one recipe per method: the label loss at the
weight the method's authors pair it with, plus the method at its default weight (the file's variants then follow
the methods). Feature methods take their layer pairs from ``compare.feature_pairs`` and relation methods from
``compare.embedding_pairs`` (default: the penultimate features, ``head:in``). The teacher is trained once and
cached; every row reports mean ± std over seeds. With ``resume``, a grid that was stopped goes on: finished runs
are read back, interrupted ones continue from their last checkpoint.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fisherkd.config import ConfigError, RunConfig, build_config, format_validation_error, read_yaml
from fisherkd.data import DataSplits, FolderSplits, load_splits
from fisherkd.engine.trainer import make_progress
from fisherkd.methods.base import method_class
from fisherkd.plots import plot_comparison
from fisherkd.provenance import provenance
from fisherkd.run import get_teacher, train

console = Console()

COLUMNS = [  # (key in a row, header, format)
    ("accuracy", "test acc %", "{:.1f}"),
    ("agreement", "agreement %", "{:.1f}"),
    ("kl", "KL(t‖s)", "{:.3f}"),
    ("ece", "ECE %", "{:.1f}"),
    ("seconds", "s / run", "{:.1f}"),
]


class CompareOptions(BaseModel):
    """The ``compare:`` block: how ``--methods`` turns method names into recipes."""

    model_config = ConfigDict(extra="forbid")

    feature_pairs: list[tuple[str, str]] = Field(default_factory=list)
    embedding_pairs: list[tuple[str, str]] = Field(default_factory=lambda: [("head:in", "head:in")])
    hparams: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-method hyper-parameters")


def slug(label: str) -> str:
    """A directory-safe name: 'kd + fitnet' -> 'kd_fitnet'."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", label).strip("_")


def method_recipe(name: str, options: CompareOptions, num_train: int) -> list[dict[str, Any]]:
    """The label loss plus one method, as its authors combine them, with pairs from the compare options."""
    cls = method_class(name)
    spec: dict[str, Any] = {"name": name, **options.hparams.get(name, {})}
    if cls.min_pairs and "pairs" not in spec:  # compare.hparams may give a method its own pairs
        pairs = options.feature_pairs if cls.family == "feature" else options.embedding_pairs
        if not pairs:
            raise ConfigError(f"method {name!r} needs layer pairs: set compare.feature_pairs in the compare file")
        spec["pairs"] = [list(p) for p in pairs]
    if "num_data" in cls.Params.model_fields and "num_data" not in spec:
        spec["num_data"] = num_train  # a memory bank has one row per training sample
    label = {"name": "ce", "weight": cls.label_weight}
    return [spec] if name == "ce" else [label, spec]  # teacher-free uskd keeps its label loss too


def build_variants(raw: dict[str, Any], methods: list[str] | None, num_train: int) -> dict[str, dict[str, Any]]:
    try:
        options = CompareOptions.model_validate(raw.get("compare") or {})
    except ValidationError as err:
        raise ConfigError(f"compare block: {format_validation_error(err, CompareOptions)}") from None
    given = raw.get("variants") or {}
    if not isinstance(given, dict):
        raise ConfigError(f"variants must be a mapping of name: {{overrides}}, not a {type(given).__name__}")
    for name, variant in given.items():
        if not isinstance(variant, dict):
            raise ConfigError(
                f"variant {name!r} must be a mapping of config keys (e.g. methods: [...]), not {variant!r}"
            )
    variants: dict[str, dict[str, Any]] = {}
    if methods:
        variants = {"scratch": {"methods": [{"name": "ce"}]}}
        variants |= {m: {"methods": method_recipe(m, options, num_train)} for m in methods if m != "scratch"}
    if clash := sorted(variants.keys() & given.keys()):
        raise ConfigError(f"variants {clash} are also --methods recipes: rename them in the compare file")
    variants |= given
    if not variants:
        raise ConfigError("nothing to compare: give --methods a,b,c or a variants: block in the compare file")
    return variants


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` laid over it: mappings merge key by key, anything else is replaced.

    So a variant's ``train: {augment: {mixup_alpha: 1.0}}`` changes only that knob; ``teacher: {name: null,
    members: [...]}`` swaps the teacher for an ensemble.
    """
    out = dict(base)
    for key, value in override.items():
        both_mappings = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if both_mappings else value
    return out


def train_or_resume(
    config: RunConfig, runs_dir: Path, splits: DataSplits | FolderSplits, progress: Progress
) -> dict[str, Any]:
    """The summary of ``runs_dir/<name>``: read if that run finished, continued if it has a checkpoint, else trained.

    A finished run is reused only if it was made from the same config, so a changed recipe is never mixed in.
    """
    run_dir = runs_dir / config.name
    if (run_dir / "config.yaml").exists():
        saved = read_yaml(run_dir / "config.yaml", "run config")
        # compared as validated configs, so that a field added since (at its default) is no difference
        if build_config(saved).model_dump(mode="json") != config.model_dump(mode="json"):
            raise ConfigError(
                f"{run_dir} was made from a different config: remove it, or compare into another --output"
            )
    if (run_dir / "summary.json").exists():
        return json.loads((run_dir / "summary.json").read_text())
    if (run_dir / "checkpoints" / "last.pt").exists():
        return train(config, run_dir=run_dir, resume=True, splits=splits, progress=progress)
    shutil.rmtree(run_dir, ignore_errors=True)  # stopped before its first checkpoint: start it again
    return train(config, run_dir=run_dir, splits=splits, progress=progress)


def run_compare(
    raw: dict[str, Any],
    output_dir: Path,
    seeds: int = 3,
    methods: list[str] | None = None,
    overrides: list[str] | None = None,
    title: str | None = None,
    reference: dict[str, float] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train every variant for ``seeds`` seeds; print the table; write results.{md,csv,json} and comparison.png.

    With ``resume``, runs already in ``output_dir/runs`` are reused or continued (see :func:`train_or_resume`).
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output {str(output_dir)!r} is a file: give a directory for the runs and the table")
    raw = dict(raw)
    base_raw = {k: v for k, v in raw.items() if k not in ("variants", "compare")}
    base_raw["output_dir"] = str(output_dir / "runs")
    base = build_config(base_raw, overrides)
    splits = load_splits(base.data)
    variants = build_variants(raw, methods, len(splits.train))
    configs = {
        label: [
            build_config(merged(base.model_dump(mode="json"), {**v, "name": f"{slug(label)}-seed{s}", "seed": s}))
            for s in range(seeds)
        ]
        for label, v in variants.items()
    }  # every variant is validated before anything trains
    started = time.perf_counter()
    rows = []
    with make_progress() as progress:
        teacher_record = get_teacher(base, splits, progress)[1] if base.teacher else {}
        for label, seed_configs in configs.items():
            summaries = [
                train_or_resume(c, output_dir / "runs", splits, progress)
                if resume
                else train(c, splits=splits, progress=progress)
                for c in seed_configs
            ]
            rows.append(aggregate(label, seed_configs[0], summaries))
    result = {
        "title": title or default_title(base),
        "teacher": teacher_record,
        "teacher_accuracy": 100 * rows[0]["teacher_accuracy"] if base.teacher else None,
        "seeds": seeds,
        "total_seconds": time.perf_counter() - started,
        "rows": rows,
        **provenance(base.device if base.device != "auto" else None),  # where these numbers were measured
    }
    print_table(result)
    write_results(result, output_dir, reference)
    return result


def default_title(config: RunConfig) -> str:
    teacher = f"{config.teacher.name} teacher → " if config.teacher else ""
    student = config.student.name or f"pruned {config.teacher.name}"  # from_teacher names no model of its own
    return f"{config.data.name}: {teacher}{student} student"


def aggregate(label: str, config: RunConfig, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    def values(key: str, scale: float = 1.0) -> list[float]:
        return [scale * s[key] for s in summaries if key in s]

    row: dict[str, Any] = {"variant": label, "methods": [m.name for m in config.methods], "seeds": len(summaries)}
    for key, source, scale in [
        ("accuracy", "test_accuracy", 100),
        ("agreement", "test_agreement", 100),
        ("kl", "test_kl", 1),
        ("ece", "test_ece", 100),
        ("seconds", "train_seconds", 1),
    ]:
        samples = values(source, scale)
        if samples:
            row[f"{key}_mean"] = statistics.fmean(samples)
            row[f"{key}_std"] = statistics.stdev(samples) if len(samples) > 1 else 0.0
    row["accuracies"] = values("test_accuracy", 100)
    row["teacher_accuracy"] = summaries[0].get("test_teacher_accuracy")
    return row


def cell(row: dict[str, Any], key: str, fmt: str) -> str:
    if f"{key}_mean" not in row:
        return ""
    text = fmt.format(row[f"{key}_mean"])
    return f"{text} ± {fmt.format(row[f'{key}_std'])}" if key == "accuracy" else text


def row_label(row: dict[str, Any], result: dict[str, Any]) -> str:
    """The variant's name, with its own teacher's accuracy when that is not the table's teacher (an ensemble)."""
    own, shared = row.get("teacher_accuracy"), result["teacher_accuracy"]
    if own is None or shared is None or abs(100 * own - shared) < 0.05:
        return row["variant"]
    return f"{row['variant']} (its teacher: {100 * own:.1f})"


def print_table(result: dict[str, Any]) -> None:
    table = Table(title=result["title"])
    table.add_column("student training")
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="right")
    if result["teacher_accuracy"] is not None:
        table.add_row("teacher", f"{result['teacher_accuracy']:.1f}", "100.0", "0", "", "", end_section=True)
    for row in result["rows"]:
        table.add_row(row_label(row, result), *(cell(row, key, fmt) for key, _, fmt in COLUMNS))
    console.print(table)
    console.print(f"seeds per row: {result['seeds']}  total: {result['total_seconds']:.0f} s")


def write_results(result: dict[str, Any], output_dir: Path, reference: dict[str, float] | None = None) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(result, indent=2))
    headers = ["student training", *(header for _, header, _ in COLUMNS)]
    lines = [f"| {' | '.join(headers)} |", "|" + "---|" * len(headers)]
    if result["teacher_accuracy"] is not None:
        lines.append(f"| teacher | {result['teacher_accuracy']:.1f} | 100.0 | 0 | | |")
    lines += [
        f"| {row_label(r, result)} | " + " | ".join(cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in result["rows"]
    ]
    lines += ["", f"{result['title']}. Mean ± std over {result['seeds']} seeds."]
    (output_dir / "results.md").write_text("\n".join(lines) + "\n")
    with open(output_dir / "results.csv", "w", newline="") as f:
        keys = ["variant", *(f"{k}_{s}" for k, _, _ in COLUMNS for s in ("mean", "std"))]
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result["rows"])
    refs = dict(reference or {})
    if result["teacher_accuracy"] is not None:
        refs = {"teacher": result["teacher_accuracy"], **refs}
    scratch = [r["accuracy_mean"] for r in result["rows"] if r["variant"] == "scratch"]
    if scratch:  # which rows beat training without a teacher, at a glance
        refs.setdefault("scratch", scratch[0])
    plot_comparison(
        [row_label(r, result) for r in result["rows"]],
        [r["accuracy_mean"] for r in result["rows"]],
        [r["accuracy_std"] for r in result["rows"]],
        output_dir / "comparison.png",
        reference=refs,
        title=result["title"],
    )
    console.print(f"wrote {output_dir}/results.md, results.csv, results.json and comparison.png")
