"""Students built from a Llama-style teacher by keeping some of its decoder layers (DistilBERT-style
initialisation; the on-policy issue's 6-of-30-layer SmolLM2 student), and students pruned by importance as a run
config's ``student: {from_teacher: {layers: 6, width: 0.5, importance: fisher, calibration: 512}}`` says
(:func:`student_from_teacher`, which calls :func:`fisherkd.prune.prune`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import ValidationError
from torch import nn

from fisherkd.config import ConfigError, FromTeacherConfig, Strict, format_validation_error
from fisherkd.prune import prune
from fisherkd.prune.hf import LAYERS, causal_lm_structures, prune_causal_lm

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["layer_subset_student", "pad_batch", "spread_layers", "student_from_teacher"]

LayerChoice = Literal["even", "first"]


def spread_layers(total: int, count: int, choice: LayerChoice = "even") -> list[int]:
    """``count`` of ``total`` layer indices: ``"first"`` the first ones, ``"even"`` evenly spaced from the first to
    the last (round(i·(total − 1)/(count − 1)))."""
    if not 1 <= count <= total:
        raise ValueError(f"cannot keep {count} of {total} layers: keep 1 to {total}")
    if choice == "first":
        return list(range(count))
    if choice == "even":
        return [0] if count == 1 else [round(i * (total - 1) / (count - 1)) for i in range(count)]
    raise ValueError(f"layer choice {choice!r} is unknown: use 'even' or 'first', or pass the layer indices")


def layer_subset_student(teacher: nn.Module, layers: int | Sequence[int], choice: LayerChoice = "even") -> nn.Module:
    """A new model of the teacher's class with the chosen decoder layers (indices, or a count picked by
    ``choice``) and the teacher's embeddings, final norm and head, all copied: equal to the teacher with the other
    blocks skipped. Saves with ``save_pretrained`` like any model of its family."""
    structures = causal_lm_structures(teacher)
    total = next(s.size for s in structures if s.name == LAYERS)
    indices = spread_layers(total, layers, choice) if isinstance(layers, int) else sorted(set(layers))
    if not indices or indices[0] < 0 or indices[-1] >= total:
        raise ValueError(f"layer indices {list(layers)} must lie in 0..{total - 1} (the teacher has {total} layers)")
    keep = {s.name: torch.arange(s.size) for s in structures}
    keep[LAYERS] = torch.tensor(indices)
    return prune_causal_lm(teacher, keep)


_COLUMNS = ("input_ids", "attention_mask", "labels")


class _Block(Strict):
    """``from_teacher: {...}`` as it appears under ``student:`` in a run config, so errors name that key path."""

    from_teacher: FromTeacherConfig


def student_from_teacher(
    teacher: PreTrainedModel,
    from_teacher: FromTeacherConfig | Mapping[str, Any],
    calibration: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    *,
    batch_size: int = 8,
) -> PreTrainedModel:
    """The teacher pruned by a run config's ``student: {from_teacher: {...}}`` block (:func:`fisherkd.prune.prune`):
    a real, smaller model of the teacher's class that saves with ``save_pretrained``.

    ``from_teacher`` is validated by :class:`fisherkd.config.FromTeacherConfig`, the class a vision run config uses, so
    ``{layers: 6, width: 0.5, importance: fisher, calibration: 512}`` means the same on both sides; a bad key or
    value raises a one-line :class:`~fisherkd.config.ConfigError`. ``calibration`` holds tokenized examples: a
    sequence of mappings (a list of dicts, a ``datasets.Dataset``) or a tokenizer's output (column → N × T), each
    example with ``input_ids`` and optionally ``attention_mask`` and ``labels`` (other columns are ignored). The
    spec's ``calibration`` examples are drawn without replacement, seeded by its ``seed`` (0 when unset) —
    ``torch.randperm(len(calibration))[:n]`` in that order, all when there are fewer — and right-padded into batches
    of ``batch_size`` (pads masked out, labels -100), on the teacher's device. The teacher is left as it was.
    """
    if not isinstance(from_teacher, FromTeacherConfig):
        try:
            from_teacher = _Block.model_validate({"from_teacher": from_teacher}).from_teacher
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, _Block)) from None
    spec = from_teacher
    arguments = spec.prune_arguments()  # an unset seed is 0 here: no run seed to take it from
    seed = arguments["seed"]
    examples = _examples(calibration)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[: spec.calibration]
    chosen = [examples[i] for i in order.tolist()]
    pad = getattr(teacher.config, "pad_token_id", None) or 0
    device = next(teacher.parameters()).device
    # padding is masked: pads add nothing to any importance (means over real tokens, no log-likelihood on pads)
    batches = [pad_batch(chosen[i : i + batch_size], pad, device) for i in range(0, len(chosen), batch_size)]
    return prune(teacher, batches, **arguments).model


def _examples(calibration: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
    """One mapping per example: the sequence itself, or the rows of a tokenizer's output (column → N × T)."""
    if isinstance(calibration, Mapping):
        if "input_ids" not in calibration:
            raise ValueError("calibration: a mapping of columns needs input_ids (a tokenizer's output, N × T)")
        columns = {k: calibration[k] for k in _COLUMNS if k in calibration}
        return [{k: v[i] for k, v in columns.items()} for i in range(len(columns["input_ids"]))]
    if len(calibration) == 0:
        raise ValueError("calibration is empty: give tokenized examples with input_ids")
    return calibration


def pad_batch(examples: Sequence[Mapping[str, Any]], pad_token_id: int, device: torch.device | str = "cpu") -> dict:
    """Examples (``input_ids``, optionally ``attention_mask`` / ``labels``, lists or 1-D tensors) right-padded to
    their longest into one batch: ``input_ids`` with ``pad_token_id``, ``attention_mask`` 0 and ``labels`` -100 on
    the padding (every given column of an example; a missing attention mask is all ones)."""
    rows = []
    for i, example in enumerate(examples):
        if "input_ids" not in example:
            raise ValueError(f"calibration example {i} has no input_ids (keys: {sorted(example)}): tokenize it first")
        ids = torch.as_tensor(example["input_ids"], dtype=torch.long).reshape(-1)
        row = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        row |= {k: torch.as_tensor(example[k], dtype=torch.long).reshape(-1) for k in _COLUMNS[1:] if k in example}
        rows.append(row)
    length = max(len(r["input_ids"]) for r in rows)
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": -100}
    keys = [k for k in _COLUMNS if all(k in r for r in rows)]
    if any("labels" in r for r in rows) and "labels" not in keys:
        raise ValueError("calibration: some examples have labels and some do not; give labels to all or none")
    batch = {}
    for k in keys:
        column = torch.full((len(rows), length), fill[k], dtype=torch.long)
        for j, r in enumerate(rows):
            column[j, : len(r[k])] = r[k]
        batch[k] = column.to(device)
    return batch
