"""Cross-tokenizer distillation in ``DistillationTrainer``: the config and the batch alignment it trains on.

A teacher whose tokenizer differs from the student's cannot read the student's ids. For every micro-batch the
trainer (:func:`align_batch`):

1. decodes each row of the student batch (``input_ids``, ``attention_mask``, ``labels`` with -100 on the prompt)
   with the student's tokenizer, and finds each student token's character range in that text (the tokenizer's
   offsets when re-tokenizing the text gives back the same ids, else cumulative decoding, which is exact for
   any ids, e.g. a sampled completion that is not the canonical tokenization of its text);
2. tokenizes the text with the teacher's tokenizer (with its special tokens, e.g. its BOS) — the teacher runs
   on these ids;
3. aligns the two tokenizations by text (:func:`fisherkd.hf.alignment.align_offsets`) and keeps one pair of
   predicting positions per aligned span (student position, teacher position: both models have read the same
   text and predict the first token of the span) whose student token is labelled, i.e. in the completion.

The loss (``uld``, ``span_kl`` or ``dskd`` of :mod:`fisherkd.functional.cross_tokenizer`) is summed over those
pairs and divided by the number of pairs of the whole accumulated batch (counted after on-policy generation),
like the token loss over ``num_items_in_batch``. The text is the student's decoding of its ids, not a dataset
column, so the same path works for the data's completions, on-policy completions and DistiLLM's replayed ones,
with no change to the dataset.

DSKD (``loss="dskd"``) also reads both models' last hidden states at the pairs (the trainer asks the models for
``output_hidden_states`` only then) and trains two projectors between the hidden spaces,
:class:`DualSpaceProjectors`. The trainer owns them (``trainer.dskd_projectors``), not the student: they are
optimised and gradient-clipped with the student, and saved in every checkpoint beside it
(``fisherkd_projectors.pt``), so that ``save_pretrained`` of the student stays a plain student.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fisherkd.core import nearest
from fisherkd.hf.alignment import align_offsets, offsets_by_decoding, token_offsets

__all__ = ["CROSS_TOKENIZER_LOSSES", "CrossTokenizerConfig", "DualSpaceProjectors", "align_batch"]

CROSS_TOKENIZER_LOSSES: tuple[str, ...] = ("uld", "span_kl", "dskd")
# ULD: λ = 1.5 beside the cross-entropy (Boizard et al. 2024, distil_factor); GOLD: uld_distillation_weight 1;
# DSKD: kd_rate 0.5, i.e. 0.5·CE + 0.5·dskd (songmzhang/DSKD)
DEFAULT_WEIGHTS = {"uld": 1.5, "span_kl": 1.0, "dskd": 0.5}
# the cross-entropy weight that comes with each loss when label_loss_weight is not given (GOLD: 0)
DEFAULT_LABEL_WEIGHTS = {"uld": 1.0, "span_kl": 0.0, "dskd": 0.5}
# ULD and GOLD use τ = 1; every DSKD script passes --kd-temperature 2.0
DEFAULT_TEMPERATURES = {"uld": 1.0, "span_kl": 1.0, "dskd": 2.0}
IGNORE = -100


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class CrossTokenizerConfig:
    """Distillation between models with different tokenizers (module docstring). The teacher's tokenizer is
    passed to the trainer beside the student's, ``DistillationTrainer(..., processing_class=student_tok,
    teacher_processing_class=teacher_tok)``, so that this config holds plain values only.

    - ``loss``: ``"uld"`` (Boizard et al. 2024: sorted-probability L1, no vocabulary correspondence),
      ``"span_kl"`` (GOLD's hybrid: KL on the tokens whose strings both vocabularies have + ULD on the rest) or
      ``"dskd"`` (Zhang et al. 2024: KD in each model's space through trained projectors of the hidden states).
    - ``weight``: None gives the authors' (ULD 1.5, span_kl 1, DSKD 0.5); with ``label_loss_weight`` unset the
      config adds the cross-entropy they pair it with (ULD 1, GOLD 0, DSKD 0.5).
    - ``temperature`` (both models, no τ²; None: the authors', ULD and span_kl 1, DSKD 2), ``chunk_size``
      (aligned rows per chunk; None: 8 MiB chunks).
    - ``top_k``: ULD only, compare the k largest probabilities of each side (None: full vocabularies).
    - ``matched_weight`` / ``unmatched_weight``: span_kl only, both or neither; None: TRL's adaptive K/V_t and
      1 − K/V_t (K shared tokens, V_t the teacher's logit width).
    - ``correct_only``: DSKD only; score the KD in the student's space only where the projected teacher predicts
      the label (the authors' cross-vocabulary code). None: True.
    - ``teacher_max_length``: truncate the teacher's ids to this many tokens (its tokenizer may split the text
      into more tokens than the student's); the text beyond is not compared. None: no truncation.
    """

    loss: str = "uld"
    weight: float | None = None
    temperature: float | None = None
    chunk_size: int | None = None
    top_k: int | None = None
    matched_weight: float | None = None
    unmatched_weight: float | None = None
    teacher_max_length: int | None = None
    correct_only: bool | None = None

    def __post_init__(self) -> None:
        if self.loss not in CROSS_TOKENIZER_LOSSES:
            raise ValueError(
                f"cross_tokenizer loss {self.loss!r} is unknown; {nearest(str(self.loss), CROSS_TOKENIZER_LOSSES)}"
            )
        if self.weight is None:
            self.weight = DEFAULT_WEIGHTS[self.loss]
        if self.temperature is None:
            self.temperature = DEFAULT_TEMPERATURES[self.loss]
        if self.correct_only is not None and self.loss != "dskd":
            raise ValueError("cross_tokenizer correct_only is for loss 'dskd'")
        if self.loss == "dskd" and self.correct_only is None:
            self.correct_only = True
        if self.correct_only is not None and not isinstance(self.correct_only, bool):
            raise ValueError(f"cross_tokenizer correct_only must be True, False or None, got {self.correct_only!r}")
        if not _is_number(self.weight) or self.weight < 0:
            raise ValueError(f"cross_tokenizer weight must be a number >= 0, got {self.weight!r}")
        if not _is_number(self.temperature) or self.temperature <= 0:
            raise ValueError(f"cross_tokenizer temperature must be a number > 0, got {self.temperature!r}")
        for name in ("chunk_size", "top_k", "teacher_max_length"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"cross_tokenizer {name} must be a positive integer or None, got {value!r}")
        if self.top_k is not None and self.loss != "uld":
            raise ValueError("cross_tokenizer top_k is for loss 'uld'; span_kl compares the full vocabularies")
        given = [w is not None for w in (self.matched_weight, self.unmatched_weight)]
        if any(given) and self.loss != "span_kl":
            raise ValueError("cross_tokenizer matched_weight / unmatched_weight are for loss 'span_kl'")
        if any(given) and not all(given):
            raise ValueError(
                "cross_tokenizer: give both matched_weight and unmatched_weight, or neither for the adaptive "
                "K/V_t and 1 - K/V_t"
            )
        for name in ("matched_weight", "unmatched_weight"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or value < 0):
                raise ValueError(f"cross_tokenizer {name} must be a number >= 0 or None, got {value!r}")

    @classmethod
    def from_mapping(cls, fields: Mapping[str, Any]) -> CrossTokenizerConfig:
        """A config from a dict of its fields; an unknown key fails with the nearest field names."""
        known = [f.name for f in dataclasses.fields(cls)]
        for key in fields:
            if key not in known:
                raise ValueError(f"cross_tokenizer has no field {key!r}; {nearest(str(key), known)}")
        return cls(**fields)


class DualSpaceProjectors(nn.Module):
    """DSKD's two projectors between the hidden spaces, one ``nn.Linear`` each way as the authors' default
    (``"s-t"`` and ``"t-s"`` in their projector config): ``student_to_teacher`` d_s → d_t (the student read by the
    teacher's head) and ``teacher_to_student`` d_t → d_s (the teacher read by the student's head). Inputs are
    cast to the projectors' dtype (fp32 by default, whatever the models')."""

    def __init__(self, student_hidden_size: int, teacher_hidden_size: int) -> None:
        super().__init__()
        self.student_to_teacher = nn.Linear(student_hidden_size, teacher_hidden_size)
        self.teacher_to_student = nn.Linear(teacher_hidden_size, student_hidden_size)

    def to_teacher(self, hidden: Tensor) -> Tensor:
        return self.student_to_teacher(hidden.to(self.student_to_teacher.weight.dtype))

    def to_student(self, hidden: Tensor) -> Tensor:
        return self.teacher_to_student(hidden.to(self.teacher_to_student.weight.dtype))


def student_offsets(tokenizer: Any, ids: list[int]) -> tuple[str, list[tuple[int, int]], list[bool]]:
    """The text that ``ids`` decode to, each token's character range in it, and whether it carries text.

    Special tokens carry none. When the fast tokenizer, re-run on the text, gives back the same (non-special)
    ids, its offsets are used (linear time); else cumulative decoding (quadratic in the row length), which
    holds for any ids, e.g. a sampled completion whose tokens are not the canonical split of its text.
    """
    special_ids = set(tokenizer.all_special_ids)
    special = [i in special_ids for i in ids]
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    plain = [i for i, s in zip(ids, special) if not s]
    if getattr(tokenizer, "is_fast", False):
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(encoding["input_ids"]) == plain:
            found = iter(encoding["offset_mapping"])
            offsets = [(0, 0) if s else tuple(map(int, next(found))) for s in special]
            return text, offsets, [not s and a < b for s, (a, b) in zip(special, offsets)]
    offsets = offsets_by_decoding(tokenizer, text, ids, special)
    return text, offsets, [not s and a < b for s, (a, b) in zip(special, offsets)]


def align_batch(
    batch: Mapping[str, Tensor], student_tokenizer: Any, teacher_tokenizer: Any, max_length: int | None = None
) -> dict[str, Tensor]:
    """The teacher's view of a student batch and the aligned pairs of predicting positions (module docstring).

    Returns ``teacher_input_ids`` and ``teacher_attention_mask`` [B, T_t] (right-padded with the teacher's pad
    id, 0 without one; ``max_length`` truncates the teacher's ids) and ``aligned_positions`` [P, 3]: (row,
    student position, teacher position). The student's logits at the student position and the teacher's at the
    teacher position predict the same continuation, and the student's next token there is labelled. Each row's
    attended tokens must be contiguous (left or right padding).
    """
    ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask", torch.ones_like(ids))
    teacher_rows: list[list[int]] = []
    pairs: list[tuple[int, int, int]] = []
    for b in range(ids.shape[0]):
        where = mask[b].nonzero().squeeze(1).tolist()
        if where and where[-1] - where[0] + 1 != len(where):
            raise ValueError(
                f"row {b} of the batch has padding between its tokens; cross-tokenizer alignment needs each row's "
                "tokens contiguous (left or right padding), not packed sequences"
            )
        row_ids = ids[b, where].tolist()
        row_labels = labels[b, where].tolist()
        text, s_offsets, s_keep = student_offsets(student_tokenizer, row_ids)
        t_ids, t_offsets, t_keep = token_offsets(teacher_tokenizer, text, max_length=max_length)
        teacher_rows.append(t_ids)
        for span in align_offsets(s_offsets, t_offsets, s_keep, t_keep):
            first_s, first_t = span.student[0], span.teacher[0]
            # a span at the start of either sequence has no predicting position; prompt spans are read, not scored
            if first_s == 0 or first_t == 0 or row_labels[first_s] == IGNORE:
                continue
            pairs.append((b, where[first_s - 1], first_t - 1))
    pad = teacher_tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    width = max((len(r) for r in teacher_rows), default=0)
    teacher_ids = torch.full((len(teacher_rows), width), pad, dtype=torch.long)
    teacher_mask = torch.zeros((len(teacher_rows), width), dtype=torch.long)
    for b, row in enumerate(teacher_rows):
        teacher_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        teacher_mask[b, : len(row)] = 1
    device = ids.device
    return {
        "teacher_input_ids": teacher_ids.to(device),
        "teacher_attention_mask": teacher_mask.to(device),
        "aligned_positions": torch.tensor(pairs, dtype=torch.long, device=device).reshape(-1, 3),
    }
