"""Let the teacher choose the student's data: MiniPLM's difference sampling (Gu et al., ICLR 2025, "MiniPLM:
Knowledge Distillation for Pre-Training Language Models").

Every document x of a corpus is scored by the teacher and by a small reference model with its mean log-likelihood
per predicted token, ``s(x) = (1/|x|) Σ_t log p(x_t | x_<t)``, and the documents with the largest difference

    d(x) = s_teacher(x) − s_reference(x)

are kept: the top ``floor(keep_ratio · N)`` by d (at least one; ties keep corpus order), as the authors' scripts
do (a per-token mean of the LM loss, then a descending sort cut at ``int(ratio · N)``). Text that the teacher
finds much likelier than a weak model does is the teacher's knowledge rather than easy or noisy text; the student
then trains on the refined corpus with no teacher at training time, whatever its architecture.

Scoring: each model reads the document with its own tokenizer (special tokens as the tokenizer adds them, e.g.
a BOS), so teacher and reference may come from different families; then their means are per token of different
vocabularies (nats per teacher token minus nats per reference token), which ranks documents but is not a
likelihood ratio. A document longer than ``max_length`` tokens is *chunked*, not truncated: windows of
``max_length`` tokens that overlap by one token, so every token after the first is predicted exactly once (with
the context of its own window). A document with fewer than two tokens predicts nothing: it is unscored and never
kept. Models are put in eval mode and run under ``torch.no_grad``.

Output folder of :func:`refine_corpus`:

- ``scores_teacher.jsonl``, ``scores_reference.jsonl``: the resumable checkpoint, one line per document
  (``index``, ``sha1`` of its text, ``logp_sum``, ``tokens``), appended and fsynced after every batch. An
  interrupted run called again with the same output continues after the last complete batch (a torn last line is
  cut off); batches are fixed slices of the corpus, so a resumed run computes exactly what an uninterrupted one
  does. ``meta.json`` pins ``max_length`` and the models' sizes, so a checkpoint is never mixed with other settings.
- ``refined.jsonl``: the kept documents only, in corpus order (``index``, ``text``, ``teacher_logp``,
  ``reference_logp``, ``difference``), ready to train on; the dropped documents' scores are in the checkpoints.
- ``report.json`` / ``report.md``: counts, the threshold, mean scores, and examples: the highest and the lowest
  kept, the highest and the lowest dropped; ``differences.png``: the histogram of d with the threshold.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fisherkd.errors import UserError

__all__ = ["difference_sampling", "load_causal_lm", "read_corpus", "refine_corpus", "score_documents"]

ROLES = ("teacher", "reference")


def _windows(ids: list[int], max_length: int) -> list[list[int]]:
    """Windows of at most ``max_length`` tokens overlapping by one: each token after the first is a target once."""
    return [ids[s : s + max_length] for s in range(0, len(ids) - 1, max_length - 1)]


def _window_sums(model: nn.Module, windows: list[list[int]], device: torch.device) -> list[float]:
    """Σ log p(token | its window's prefix) of each window, batched with right padding (masked)."""
    width = max(len(w) for w in windows)
    ids = torch.zeros(len(windows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, window in enumerate(windows):
        ids[row, : len(window)] = torch.tensor(window)
        mask[row, : len(window)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1]
    targets, valid = ids[:, 1:].to(device), mask[:, 1:].bool().to(device)
    sums = []
    for row in range(len(windows)):  # one row at a time: a float32 [T, V] log-softmax, not [B, T, V] (V ~ 262k)
        rows = logits[row, valid[row]].float()
        picked = rows.gather(-1, targets[row, valid[row], None]).squeeze(-1)
        sums.append((picked - rows.logsumexp(-1)).double().sum())
    return torch.stack(sums).tolist()


def _check_length(model: nn.Module, max_length: int) -> None:
    if max_length < 2:
        raise UserError(f"max_length must be at least 2 (a context token and a target), got {max_length}")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and max_length > limit:
        raise UserError(
            f"max_length {max_length} exceeds the model's {limit} positions: give --max-length {limit} or less"
        )


def _scored_batches(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int, max_length: int, skip: set[int]
) -> Iterator[tuple[list[int], list[float], list[int]]]:
    """(indices, log-likelihood sums, predicted-token counts) per batch of ``batch_size`` consecutive documents;
    batches whose documents are all in ``skip`` are not computed. Each batch's windows run ``batch_size`` at a time."""
    _check_length(model, max_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                indices = list(range(start, min(start + batch_size, len(texts))))
                if all(i in skip for i in indices):
                    continue
                encoded = tokenizer([texts[i] for i in indices], add_special_tokens=True, verbose=False)["input_ids"]
                owner, windows = [], []
                for k, ids in enumerate(encoded):
                    for window in _windows(list(ids), max_length):
                        owner.append(k)
                        windows.append(window)
                sums, counts = [0.0] * len(indices), [max(len(ids) - 1, 0) for ids in encoded]
                for w in range(0, len(windows), batch_size):
                    for k, value in zip(
                        owner[w : w + batch_size], _window_sums(model, windows[w : w + batch_size], device)
                    ):
                        sums[k] += value
                yield indices, sums, counts
    finally:
        model.train(was_training)


def _mean(logp_sum: float, tokens: int) -> float | None:
    return logp_sum / tokens if tokens else None


def score_documents(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 8,
    max_length: int = 1024,
    progress: Any = None,
) -> list[float | None]:
    """Mean log-likelihood per predicted token of each text, ``(1/|x|) Σ_t log p(x_t | x_<t)`` in nats (None for
    a text of fewer than two tokens). Long texts are chunked into overlapping ``max_length`` windows (module doc).
    ``progress``: a ``rich.progress.Progress`` to show a bar on, or None."""
    task = progress.add_task("scoring", total=len(texts), info="") if progress is not None else None
    scores: list[float | None] = [None] * len(texts)
    for indices, sums, counts in _scored_batches(model, tokenizer, texts, batch_size, max_length, set()):
        for i, s, n in zip(indices, sums, counts):
            scores[i] = _mean(s, n)
        if progress is not None:
            progress.advance(task, len(indices))
    return scores


def difference_sampling(differences: Sequence[float | None], keep_ratio: float) -> list[bool]:
    """MiniPLM's selection: keep the ``floor(keep_ratio · N)`` documents (at least one) with the largest
    difference, N the number of scored ones; ties keep corpus order; unscored (None) documents are never kept."""
    if not 0 < keep_ratio <= 1:
        raise UserError(f"keep ratio must be in (0, 1] (the fraction of documents kept), got {keep_ratio}")
    scored = [i for i, d in enumerate(differences) if d is not None]
    k = max(1, math.floor(keep_ratio * len(scored) + 1e-9)) if scored else 0  # 1e-9: 0.29 · 100 is 28.999...
    kept = set(sorted(scored, key=lambda i: -differences[i])[:k])  # sorted() is stable
    return [i in kept for i in range(len(differences))]


# ---------------------------------------------------------------- the resumable checkpoint


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)  # a reader sees the old file or the whole new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_checkpoint(path: Path, texts: Sequence[str]) -> dict[int, tuple[float, int]]:
    """Index → (logp_sum, tokens) of the documents already scored; a torn last line (a crash mid-write) is cut
    off the file so that the next append starts on a fresh line."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        with path.open("r+b") as f:
            f.truncate(complete)
    done: dict[int, tuple[float, int]] = {}
    for line in data[:complete].decode("utf-8").splitlines():
        row = json.loads(line)
        i = row["index"]
        if i >= len(texts) or row["sha1"] != _sha1(texts[i]):
            raise UserError(
                f"{path} scored another corpus (document {i} differs): give another --output, or delete the folder"
            )
        done.setdefault(i, (row["logp_sum"], row["tokens"]))  # a rescored batch repeats lines: same values
    return done


def _check_meta(output: Path, meta: dict) -> None:
    path = output / "meta.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != meta:
            changed = ", ".join(k for k in meta if old.get(k) != meta[k])
            raise UserError(
                f"{output} holds scores made with other settings ({changed}): give another --output, or delete it"
            )
    else:
        _atomic_write(path, json.dumps(meta, indent=2) + "\n")


def _model_id(model: nn.Module) -> dict:
    return {
        "name": str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _score_resumable(
    role: str,
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    path: Path,
    batch_size: int,
    max_length: int,
    progress: Any,
) -> list[float | None]:
    done = _read_checkpoint(path, texts)
    task = None
    if progress is not None:
        task = progress.add_task(role, total=len(texts), completed=len(done), info=f"{len(done)} resumed")
    with path.open("a", encoding="utf-8") as f:
        for indices, sums, counts in _scored_batches(model, tokenizer, texts, batch_size, max_length, set(done)):
            f.write(
                "".join(
                    json.dumps({"index": i, "sha1": _sha1(texts[i]), "logp_sum": s, "tokens": n}) + "\n"
                    for i, s, n in zip(indices, sums, counts)
                )
            )  # one write per batch, then fsync: a batch is on disk or (torn) cut off at resume
            f.flush()
            os.fsync(f.fileno())
            new = [i for i in indices if i not in done]
            done.update({i: (s, n) for i, s, n in zip(indices, sums, counts) if i not in done})
            if progress is not None:
                progress.advance(task, len(new))
    return [_mean(*done[i]) for i in range(len(texts))]


# ---------------------------------------------------------------- refine_corpus and its report


def _same_vocabulary(a: Any, b: Any) -> bool:
    return a is b or (hasattr(a, "get_vocab") and hasattr(b, "get_vocab") and a.get_vocab() == b.get_vocab())


def _example(i: int, text: str, t: float, r: float, chars: int = 300) -> dict:
    excerpt = " ".join(text.split())
    return {
        "index": i,
        "difference": t - r,
        "teacher_logp": t,
        "reference_logp": r,
        "text": excerpt if len(excerpt) <= chars else excerpt[:chars] + " ...",
    }


def _histogram(differences: list[float], threshold: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(differences, bins=max(5, min(50, len(differences) // 4)), color="tab:blue")
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"kept ≥ {threshold:.3f}")
        ax.legend()
    ax.set_xlabel("log p_teacher − log p_reference (nats per token)")
    ax.set_ylabel("documents")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _markdown(report: dict) -> str:
    lines = [
        "# Refined corpus (MiniPLM difference sampling)",
        "",
        f"Kept {report['kept']} of {report['scored']} scored documents (keep ratio {report['keep_ratio']}; "
        f"{report['unscored']} unscored, under two tokens), difference ≥ {report['threshold']}. "
        "Difference = teacher − reference mean log-likelihood per token (nats); ![histogram](differences.png)",
        "",
    ]
    if report["tokenizers_differ"]:
        lines += ["Teacher and reference use different tokenizers: their per-token means are in different units.", ""]
    for key, title in (
        ("highest_kept", "Highest difference (kept)"),
        ("lowest_kept", "Lowest kept"),
        ("highest_dropped", "Highest dropped"),
        ("lowest_dropped", "Lowest difference (dropped)"),
    ):
        lines += [f"## {title}", "", "| index | difference | teacher | reference | text |", "|---|---|---|---|---|"]
        for e in report["examples"][key]:
            text = e["text"].replace("|", "\\|")
            lines.append(
                f"| {e['index']} | {e['difference']:.4f} | {e['teacher_logp']:.4f} | {e['reference_logp']:.4f} "
                f"| {text} |"
            )
        lines.append("")
    return "\n".join(lines)


def refine_corpus(
    teacher: nn.Module,
    reference: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    keep_ratio: float,
    output: str | Path,
    *,
    reference_tokenizer: Any = None,
    batch_size: int = 8,
    max_length: int = 1024,
    examples: int = 3,
    progress: Any = None,
) -> dict:
    """Score ``texts`` with ``teacher`` (read with ``tokenizer``) and ``reference`` (with ``reference_tokenizer``,
    default the same), keep the top ``keep_ratio`` by difference, and write the output folder described in the
    module doc. Resumable: call it again with the same arguments after an interruption. Returns the report."""
    if not 0 < keep_ratio <= 1:
        raise UserError(f"keep ratio must be in (0, 1] (the fraction of documents kept), got {keep_ratio}")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if not any(text.strip() for text in texts):
        raise UserError("the corpus is empty (no document has text): give a JSONL with a 'text' field or .txt files")
    for model in (teacher, reference):
        _check_length(model, max_length)
    reference_tokenizer = reference_tokenizer if reference_tokenizer is not None else tokenizer
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    _check_meta(
        output,
        {
            "max_length": max_length,
            "documents": len(texts),
            "teacher": _model_id(teacher),
            "reference": _model_id(reference),
        },
    )
    scores = {
        role: _score_resumable(
            role, model, tok, texts, output / f"scores_{role}.jsonl", batch_size, max_length, progress
        )
        for role, model, tok in zip(ROLES, (teacher, reference), (tokenizer, reference_tokenizer))
    }
    t, r = scores["teacher"], scores["reference"]
    diff = [a - b if a is not None and b is not None else None for a, b in zip(t, r)]
    kept = difference_sampling(diff, keep_ratio)

    scored = [i for i, d in enumerate(diff) if d is not None]
    order = sorted(scored, key=lambda i: -diff[i])
    kept_order = [i for i in order if kept[i]]
    dropped_order = [i for i in order if not kept[i]]

    def pick(indices: list[int]) -> list[dict]:
        return [_example(i, texts[i], t[i], r[i]) for i in indices]

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    threshold = diff[kept_order[-1]] if kept_order else None
    report = {
        "documents": len(texts),
        "scored": len(scored),
        "unscored": len(texts) - len(scored),
        "kept": len(kept_order),
        "dropped": len(dropped_order),
        "keep_ratio": keep_ratio,
        "threshold": threshold,
        "max_length": max_length,
        "tokenizers_differ": not _same_vocabulary(tokenizer, reference_tokenizer),
        "mean_teacher_logp": mean([t[i] for i in scored]),
        "mean_reference_logp": mean([r[i] for i in scored]),
        "mean_difference_kept": mean([diff[i] for i in kept_order]),
        "mean_difference_dropped": mean([diff[i] for i in dropped_order]),
        "examples": {
            "highest_kept": pick(kept_order[:examples]),
            "lowest_kept": pick(kept_order[::-1][:examples]),
            "highest_dropped": pick(dropped_order[:examples]),
            "lowest_dropped": pick(dropped_order[::-1][:examples]),
        },
    }
    _atomic_write(
        output / "refined.jsonl",
        "".join(
            json.dumps(
                {"index": i, "text": texts[i], "teacher_logp": t[i], "reference_logp": r[i], "difference": diff[i]}
            )
            + "\n"
            for i in range(len(texts))
            if kept[i]
        ),
    )
    _histogram([diff[i] for i in scored], threshold, output / "differences.png")
    _atomic_write(output / "report.json", json.dumps(report, indent=2) + "\n")
    _atomic_write(output / "report.md", _markdown(report))
    return report


# ---------------------------------------------------------------- the CLI's inputs


def read_corpus(path: str | Path) -> list[str]:
    """The documents of a JSONL file (one object with a ``text`` string per line) or of a folder's ``*.txt``
    files (searched recursively, in sorted path order, one document per file)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise UserError(f"corpus folder {path} has no .txt files: give a folder of .txt files or a JSONL file")
        texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    elif path.is_file():
        texts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {number} is not JSON ({err.msg}): the corpus is JSONL") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise UserError(f"{path} line {number} has no 'text' string: each line must be {{\"text\": ...}}")
            texts.append(row["text"])
    else:
        raise FileNotFoundError(f"corpus {path} does not exist: give a JSONL file with a 'text' field or a folder")
    if not any(text.strip() for text in texts):
        raise UserError(f"corpus {path} is empty (no document has text)")
    return texts


def load_causal_lm(path: str | Path, what: str = "model") -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a local Hugging Face folder (``config.json``) or a GGUF file (dequantised, through
    :func:`fisherkd.hf.offline.load_gguf_causal_lm`). Nothing is downloaded."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from fisherkd.hf.offline import load_gguf_causal_lm

        return load_gguf_causal_lm(path)
    if path.is_dir() and (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        return model, AutoTokenizer.from_pretrained(path, local_files_only=True)
    problem = "does not exist" if not path.exists() else "is neither a .gguf file nor a folder with config.json"
    raise FileNotFoundError(f"{what} {path} {problem}: give a local Hugging Face model folder or a .gguf file")
