"""GLUE tasks (Wang et al. 2019) from the TSV files of the GLUE distribution (``glue_data/<TASK>/train.tsv``...).

Text, not arrays: :func:`load_glue` returns sentences and labels, :func:`tokenize_glue` turns them into model
inputs with a Hugging Face tokenizer. GLUE's test labels are private, so the evaluation split is ``dev``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fisherkd.data.common import require_path


@dataclass(frozen=True)
class GlueTask:
    """Where a task's fields are: header names (or column numbers for header-less files) and label values."""

    text_a: str | int
    text_b: str | int | None
    label: str | int
    labels: tuple[str, ...] | None  # None: regression (a float score)
    dev_file: str = "dev.tsv"
    header: bool = True


_NLI_LABELS = ("contradiction", "entailment", "neutral")

# Label orders follow the Hugging Face GLUE processors, so label ids match models fine-tuned there.
GLUE_TASKS = {
    "cola": GlueTask(3, None, 1, ("0", "1"), header=False),
    "sst2": GlueTask("sentence", None, "label", ("0", "1")),
    "mrpc": GlueTask("#1 String", "#2 String", "Quality", ("0", "1")),
    "qqp": GlueTask("question1", "question2", "is_duplicate", ("0", "1")),
    "stsb": GlueTask("sentence1", "sentence2", "score", None),
    "mnli": GlueTask("sentence1", "sentence2", "gold_label", _NLI_LABELS, "dev_matched.tsv"),
    "mnli-mm": GlueTask("sentence1", "sentence2", "gold_label", _NLI_LABELS, "dev_mismatched.tsv"),
    "qnli": GlueTask("question", "sentence", "label", ("entailment", "not_entailment")),
    "rte": GlueTask("sentence1", "sentence2", "label", ("entailment", "not_entailment")),
    "wnli": GlueTask("sentence1", "sentence2", "label", ("0", "1")),
}

# Folder names of the GLUE distribution that do not lower-case to a task name above.
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb"}


@dataclass
class GlueExamples:
    """One split: ``text_a[i]`` (and ``text_b[i]`` for sentence-pair tasks) with ``labels[i]``, a class index, or
    a float score for regression (STS-B)."""

    text_a: list[str]
    text_b: list[str] | None
    labels: list[int] | list[float]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class GlueSplits:
    task: str
    train: GlueExamples
    dev: GlueExamples
    label_names: tuple[str, ...] | None  # None for regression

    @property
    def num_labels(self) -> int:
        """Number of classes; 1 for regression, as Hugging Face's ``num_labels`` expects."""
        return len(self.label_names) if self.label_names else 1


def _column(header: list[str], field: str | int, path: Path) -> int:
    if isinstance(field, int):
        return field
    if field not in header:
        raise ValueError(f"{path} has no column {field!r} in its header {header}")
    return header.index(field)


def read_glue_tsv(path: Path, task: GlueTask) -> GlueExamples:
    """Read one GLUE TSV. Quotes are literal text in GLUE files, so quoting is off (as in the reference loaders)."""
    csv.field_size_limit(2**31 - 1)  # a few GLUE fields exceed csv's 128 KiB default (2**31 − 1: a C long anywhere)
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = rows.pop(0) if task.header and rows else []
    fields = (task.text_a, task.text_b, task.label)
    a, b, y = (None if field is None else _column(header, field, path) for field in fields)
    text_a, text_b, labels = [], [], []
    for line, row in enumerate(rows, start=2 if task.header else 1):
        if not row:
            continue
        if len(row) <= max(i for i in (a, b, y) if i is not None):
            raise ValueError(f"{path}:{line}: only {len(row)} tab-separated fields")
        value = row[y]
        if task.labels is None:
            labels.append(float(value))
        elif value in task.labels:
            labels.append(task.labels.index(value))
        else:
            raise ValueError(f"{path}:{line}: label {value!r} is not one of {', '.join(task.labels)}")
        text_a.append(row[a])
        if b is not None:
            text_b.append(row[b])
    return GlueExamples(text_a, text_b if b is not None else None, labels)


def load_glue(root: str | Path, task: str | None = None) -> GlueSplits:
    """Read ``train.tsv`` and the dev file of a GLUE task folder ``root``.

    ``task`` (cola, sst2, mrpc, qqp, stsb, mnli, mnli-mm, qnli, rte, wnli; case and a dash ignored, e.g. "SST-2")
    defaults to the folder's name, as in the GLUE distribution. MNLI's dev split is ``dev_matched.tsv``
    (``mnli-mm``: ``dev_mismatched.tsv``, same folder).
    """
    how = "pass root= a GLUE task folder with train.tsv and dev.tsv (from the GLUE benchmark distribution)"
    root = require_path(root, "GLUE task folder", how)
    key = (task or root.name).lower()
    key = _ALIASES.get(key, key)
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task or root.name!r}; pass task= one of {', '.join(GLUE_TASKS)}")
    spec = GLUE_TASKS[key]
    train = read_glue_tsv(require_path(root / "train.tsv", f"{key} training file", how), spec)
    dev = read_glue_tsv(require_path(root / spec.dev_file, f"{key} dev file", how), spec)
    return GlueSplits(key, train, dev, spec.labels)


def tokenize_glue(examples: GlueExamples, tokenizer: Any, max_length: int = 128) -> dict[str, Tensor]:
    """Tokenize (pairs of) sentences, truncated and padded to ``max_length`` so every batch has one static shape.

    Returns ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the tokenizer makes them) and ``labels``
    (int64 classes, or float32 scores for regression), each with one row per example.
    """
    encoded = tokenizer(
        examples.text_a,
        examples.text_b,
        truncation=True,
        max_length=max_length,
        padding="max_length",
        return_tensors="pt",
    )
    out = {key: encoded[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded}
    regression = bool(examples.labels) and isinstance(examples.labels[0], float)
    out["labels"] = torch.tensor(examples.labels, dtype=torch.float32 if regression else torch.long)
    return out
