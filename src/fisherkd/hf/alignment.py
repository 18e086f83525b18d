"""Align two tokenizations of the same text, for distillation between models with different tokenizers.

A teacher and a student with different tokenizers split one text into different tokens, so their logits cannot
be compared position by position. This module finds where they *can* be compared, from the text itself:

1. **Offsets.** Each token's character range in the text: ``return_offsets_mapping`` of a fast tokenizer, or,
   for a tokenizer without offsets, by decoding (:func:`token_offsets`). Special tokens (BOS, EOS, padding) and
   zero-width tokens carry no text and are left out.
2. **Spans.** A *cut* of a tokenization is a character position where one token ends and the next begins no
   earlier (tokens that share a character, e.g. the byte tokens of one UTF-8 character, are never cut apart).
   A *shared boundary* is a cut of both tokenizations. Consecutive shared boundaries delimit the aligned
   spans (:func:`align_offsets`): the finest partition of the text into groups of consecutive student tokens and
   consecutive teacher tokens that cover the same characters. Gaps that no token covers (whitespace dropped by a
   word splitter, or trimmed from the offsets) belong to the span that follows them.
3. **Comparable predictions.** A causal LM's logits at position i predict token i + 1. At a shared boundary both
   models have read exactly the same text, and the logits at the token just before the boundary (on each side)
   predict the first token of the next span. These are the pairs of positions that :func:`align_texts` emits: for
   every span, (student position, teacher position) = (index of the span's first student token − 1, index of its
   first teacher token − 1). A span whose first token is the sequence's first token on either side has no
   predictor there (e.g. the first span when only one tokenizer adds a BOS token) and emits nothing. Nothing
   is emitted for what follows the last span (EOS or truncated text), as GOLD skips EOS by default.
   ``single_token`` marks pairs whose next span is one token on both sides: there both models predict the
   same string, which is in the shared vocabulary whenever both strings normalise alike. Elsewhere the two
   predictions describe the same continuation at different granularities (``" world"`` against ``" w"``),
   which ULD and GOLD compare anyway, as approximations.
4. **Vocabulary map** (:func:`vocab_map`). Token strings are normalised to the bytes they stand for (byte-level
   BPE's GPT-2 byte-to-unicode alphabet, where 'Ġ' is a space; SentencePiece's '▁' for a space and '<0xNN>'
   byte-fallback tokens for byte NN) and tokens whose bytes exist in both vocabularies are paired one to one
   (the exact support of :func:`fisherkd.functional.cross_tokenizer.span_kl_loss`).

The tokenizers are used through the Hugging Face tokenizer interface; this module does not import
``transformers``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "Span",
    "TextAlignment",
    "VocabMap",
    "align_offsets",
    "align_texts",
    "byte_level_alphabet",
    "is_byte_level",
    "normalize_token",
    "offsets_by_decoding",
    "token_offsets",
    "vocab_map",
]

Offsets = Sequence[tuple[int, int]]
OffsetMethod = Literal["auto", "fast", "decode"]

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SENTENCEPIECE_SPACE = "\u2581"  # '▁'
_REPLACEMENT = "\ufffd"  # what decoding shows for an incomplete UTF-8 character


# ----------------------------------------------------------------------------------------------------------
# Token character offsets


def token_offsets(
    tokenizer: Any,
    text: str,
    *,
    add_special_tokens: bool = True,
    max_length: int | None = None,
    method: OffsetMethod = "auto",
) -> tuple[list[int], list[tuple[int, int]], list[bool]]:
    """Token ids, character offsets and the mask of tokens that carry text, for one text.

    ``method="fast"`` reads ``return_offsets_mapping`` (fast tokenizers only); ``"decode"`` is the fallback for
    tokenizers without offsets: token k ends where the decoding of tokens 0..k ends in the text (cumulative
    decoding, so spaces and multi-byte characters come out as the decoder writes them; O(n²) decoding). A token
    that ends inside a character (one byte of a multi-byte character) gets the whole character, as fast
    tokenizers report it, and a leading space that the decoder strips (SentencePiece) is found in the text.
    The fallback needs a decoder that reproduces the text: one that normalises it (lowercasing, NFKC) fails
    with an error. ``"auto"`` uses offsets when the tokenizer is fast.

    A token carries text unless it is special (BOS/EOS/padding, offsets (0, 0)) or zero-width.
    """
    if method not in ("auto", "fast", "decode"):
        raise ValueError(f"method must be 'auto', 'fast' or 'decode', got {method!r}")
    fast = method == "fast" or (method == "auto" and getattr(tokenizer, "is_fast", False))
    kwargs: dict[str, Any] = {"add_special_tokens": add_special_tokens}
    if max_length is not None:
        kwargs.update(truncation=True, max_length=max_length)
    special_ids = set(tokenizer.all_special_ids)
    if fast:
        encoding = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True, **kwargs)
        ids = list(encoding["input_ids"])
        offsets = [(int(a), int(b)) for a, b in encoding["offset_mapping"]]
        special = [bool(m) or i in special_ids for m, i in zip(encoding["special_tokens_mask"], ids)]
    else:
        ids = list(tokenizer(text, **kwargs)["input_ids"])
        special = [i in special_ids for i in ids]
        offsets = offsets_by_decoding(tokenizer, text, ids, special)
    keep = [not s and a < b for s, (a, b) in zip(special, offsets)]
    return ids, offsets, keep


def offsets_by_decoding(tokenizer: Any, text: str, ids: list[int], special: list[bool]) -> list[tuple[int, int]]:
    """Character offsets of ``ids`` in ``text`` from cumulative decoding: exact for any ids, e.g. a sampled
    completion that is not the canonical tokenization of its text (see :func:`token_offsets`)."""
    offsets: list[tuple[int, int]] = []
    kept: list[int] = []
    lead: int | None = None  # where the decoded text starts in the text (after a leading space the decoder drops)
    done = 0  # the text position up to which the tokens so far decode to whole characters
    for k, (token_id, is_special) in enumerate(zip(ids, special)):
        if is_special:
            offsets.append((0, 0))
            continue
        kept.append(token_id)
        decoded = tokenizer.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        # an incomplete multi-byte character decodes to U+FFFD: this token ends inside the next character
        whole = decoded.rstrip(_REPLACEMENT)
        if lead is None and whole:
            # the decoder may drop leading whitespace (SentencePiece strips the space that it prepends)
            spaces = len(text) - len(text.lstrip())
            lead = next((i for i in range(spaces + 1) if text.startswith(whole, i)), -1)
        if lead is not None and lead >= 0 and text.startswith(decoded, lead):
            whole = decoded  # U+FFFD written in the text itself
        if whole and (lead is None or lead < 0 or not text.startswith(whole, lead)):
            raise ValueError(
                f"cannot find token offsets by decoding: tokens 0..{k} decode to {whole!r}, which does not "
                "start the text; the tokenizer normalises text (case, unicode), so use a fast tokenizer, whose "
                "offsets mapping is exact"
            )
        reach = max(done, (lead or 0) + len(whole)) if whole else done
        partial = len(whole) < len(decoded)
        offsets.append((done, min(reach + 1, len(text)) if partial else reach))
        done = reach
    # A token that decodes to nothing (SentencePiece's lone '▁' prepended to the first word) shares the range of
    # the token after it, as fast tokenizers report it.
    following: tuple[int, int] | None = None
    for k in range(len(ids) - 1, -1, -1):
        if special[k]:
            continue
        a, b = offsets[k]
        if a == b and following is not None and following[0] == a:
            offsets[k] = following
        following = offsets[k]
    return offsets


# ----------------------------------------------------------------------------------------------------------
# Spans


@dataclass(frozen=True)
class Span:
    """One aligned span: half-open token index ranges [start, stop) into each sequence (special and zero-width
    tokens inside the range carry no text) and the half-open character range of the text it covers."""

    student: tuple[int, int]
    teacher: tuple[int, int]
    text: tuple[int, int]


def _segments(offsets: Offsets, keep: Sequence[bool]) -> list[tuple[int, int, int]]:
    """(cut position, first token index, stop index) of each piece between consecutive cuts of one sequence."""
    kept = [i for i in range(len(offsets)) if keep[i]]
    pieces = []
    first = None
    reach = 0
    for n, i in enumerate(kept):
        if first is None:
            first = i
        reach = max(reach, offsets[i][1])
        following = kept[n + 1] if n + 1 < len(kept) else None
        # no cut inside a character shared by two tokens: the next token must start at or after the reach
        if following is None or offsets[following][0] >= reach:
            pieces.append((reach, first, i + 1))
            first = None
    return pieces


def align_offsets(
    student_offsets: Offsets,
    teacher_offsets: Offsets,
    student_keep: Sequence[bool] | None = None,
    teacher_keep: Sequence[bool] | None = None,
) -> list[Span]:
    """The aligned spans of two tokenizations of one text (module docstring, step 2), in text order.

    ``*_keep`` marks the tokens that carry text (default: every token with a non-empty range). Text after the
    last shared boundary (e.g. when one side was truncated) is in no span.
    """
    s_keep = student_keep if student_keep is not None else [a < b for a, b in student_offsets]
    t_keep = teacher_keep if teacher_keep is not None else [a < b for a, b in teacher_offsets]
    for name, offsets, keep in (("student", student_offsets, s_keep), ("teacher", teacher_offsets, t_keep)):
        if len(keep) != len(offsets):
            raise ValueError(f"{name}_keep has {len(keep)} entries for {len(offsets)} tokens")
    s_pieces, t_pieces = _segments(student_offsets, s_keep), _segments(teacher_offsets, t_keep)
    spans: list[Span] = []
    a = b = 0
    s_start = t_start = None
    text_start = None
    while a < len(s_pieces) and b < len(t_pieces):
        (s_cut, s_first, s_stop), (t_cut, t_first, t_stop) = s_pieces[a], t_pieces[b]
        s_start = s_first if s_start is None else s_start
        t_start = t_first if t_start is None else t_start
        if text_start is None:
            text_start = min(student_offsets[s_first][0], teacher_offsets[t_first][0])
        if s_cut < t_cut:
            a += 1
        elif t_cut < s_cut:
            b += 1
        else:
            spans.append(Span((s_start, s_stop), (t_start, t_stop), (text_start, s_cut)))
            a, b, s_start, t_start, text_start = a + 1, b + 1, None, None, s_cut
    return spans


# ----------------------------------------------------------------------------------------------------------
# A batch of texts


@dataclass
class TextAlignment:
    """Both tokenizations of a batch of texts (right-padded) and the aligned pairs of predicting positions.

    Pair p compares the student's logits at ``student_input_ids[batch[p], student_positions[p]]`` with the
    teacher's at ``teacher_input_ids[batch[p], teacher_positions[p]]``: both predict the first token of the same
    span (module docstring, step 3). ``student_rows`` / ``teacher_rows`` index the logits viewed as
    [B·T, V] (``logits.flatten(0, 1)``), ready for the losses of :mod:`fisherkd.functional.cross_tokenizer`.
    """

    student_input_ids: Tensor
    student_attention_mask: Tensor
    teacher_input_ids: Tensor
    teacher_attention_mask: Tensor
    batch: Tensor
    student_positions: Tensor
    teacher_positions: Tensor
    single_token: Tensor
    spans: list[list[Span]]

    @property
    def student_rows(self) -> Tensor:
        return self.batch * self.student_input_ids.shape[1] + self.student_positions

    @property
    def teacher_rows(self) -> Tensor:
        return self.batch * self.teacher_input_ids.shape[1] + self.teacher_positions


def _pad(rows: list[list[int]], value: int) -> tuple[Tensor, Tensor]:
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def align_texts(
    texts: Sequence[str],
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    *,
    add_special_tokens: bool = True,
    max_length: int | None = None,
    completion_start: Sequence[int] | None = None,
    offsets: OffsetMethod = "auto",
) -> TextAlignment:
    """Tokenize ``texts`` with both tokenizers and align them (module docstring).

    ``completion_start`` (one character position per text, e.g. the prompt's length) keeps only the pairs that
    predict a span starting at or after it, so that a prompt is read but not scored. ``max_length`` truncates
    each side to that many tokens; text beyond the shorter side is not aligned. Sequences are padded on the
    right with the tokenizer's pad id (0 when it has none), whatever the tokenizer's ``padding_side``.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, got one string; wrap it in a list")
    if completion_start is not None and len(completion_start) != len(texts):
        raise ValueError(f"completion_start has {len(completion_start)} entries for {len(texts)} texts")
    s_ids, t_ids, spans = [], [], []
    batch, s_pos, t_pos, single = [], [], [], []
    for b, text in enumerate(texts):
        s = token_offsets(
            student_tokenizer, text, add_special_tokens=add_special_tokens, max_length=max_length, method=offsets
        )
        t = token_offsets(
            teacher_tokenizer, text, add_special_tokens=add_special_tokens, max_length=max_length, method=offsets
        )
        found = align_offsets(s[1], t[1], s[2], t[2])
        s_ids.append(s[0])
        t_ids.append(t[0])
        spans.append(found)
        start = 0 if completion_start is None else completion_start[b]
        for span in found:
            i, j = span.student[0] - 1, span.teacher[0] - 1
            if i < 0 or j < 0 or span.text[0] < start:
                continue
            batch.append(b)
            s_pos.append(i)
            t_pos.append(j)
            single.append(span.student[1] - span.student[0] == 1 and span.teacher[1] - span.teacher[0] == 1)
    s_input, s_mask = _pad(s_ids, student_tokenizer.pad_token_id or 0)
    t_input, t_mask = _pad(t_ids, teacher_tokenizer.pad_token_id or 0)
    return TextAlignment(
        student_input_ids=s_input,
        student_attention_mask=s_mask,
        teacher_input_ids=t_input,
        teacher_attention_mask=t_mask,
        batch=torch.tensor(batch, dtype=torch.long),
        student_positions=torch.tensor(s_pos, dtype=torch.long),
        teacher_positions=torch.tensor(t_pos, dtype=torch.long),
        single_token=torch.tensor(single, dtype=torch.bool),
        spans=spans,
    )


# ----------------------------------------------------------------------------------------------------------
# Vocabulary map


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-to-unicode map: printable bytes stand for themselves; the others (space, control bytes, …)
    are shifted to code points 256 and up, in byte order, so that 0x20 (space) is 'Ġ' and 0x0A is 'Ċ'."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {b: chr(b) for b in printable}
    shifted = 256
    for b in range(256):
        if b not in alphabet:
            alphabet[b] = chr(shifted)
            shifted += 1
    return alphabet


_BYTE_OF = {c: b for b, c in byte_level_alphabet().items()}


def normalize_token(token: str, byte_level: bool) -> bytes:
    """The bytes of text that a vocabulary entry stands for.

    Byte-level BPE (``byte_level=True``): each character is one byte in GPT-2's alphabet (:func:`byte_level_alphabet`).
    Otherwise (SentencePiece and plain vocabularies): '▁' is a space, ``<0xNN>`` is the byte NN (byte fallback),
    and any other string is its UTF-8.
    """
    if byte_level:
        if all(c in _BYTE_OF for c in token):
            return bytes(_BYTE_OF[c] for c in token)
        return token.encode()  # not in the alphabet: an added token written as plain text
    match = _BYTE_FALLBACK.fullmatch(token)
    if match:
        return bytes([int(match.group(1), 16)])
    return token.replace(_SENTENCEPIECE_SPACE, " ").encode()


def is_byte_level(tokenizer: Any) -> bool:
    """Whether a tokenizer writes its vocabulary in GPT-2's byte-level alphabet: its fast backend has a ByteLevel
    pre-tokenizer or decoder; for a slow tokenizer, more vocabulary entries start with 'Ġ' than with '▁'."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        parts = (backend.pre_tokenizer, backend.decoder)
        return any(part is not None and b'"ByteLevel"' in part.__getstate__() for part in parts)
    vocab = tokenizer.get_vocab()
    return sum(t.startswith("Ġ") for t in vocab) > sum(t.startswith(_SENTENCEPIECE_SPACE) for t in vocab)


@dataclass(frozen=True)
class VocabMap:
    """Pairs of token ids with the same normalised string: ``student_ids[k]`` ↔ ``teacher_ids[k]`` (one to one),
    and the two tokenizers' vocabulary sizes (``len(tokenizer)``)."""

    student_ids: Tensor
    teacher_ids: Tensor
    student_size: int
    teacher_size: int

    @property
    def shared(self) -> int:
        return int(self.student_ids.numel())

    @property
    def student_fraction(self) -> float:
        """The fraction of the student's vocabulary that the teacher's also has."""
        return self.shared / max(self.student_size, 1)

    @property
    def teacher_fraction(self) -> float:
        """The fraction of the teacher's vocabulary that the student's also has."""
        return self.shared / max(self.teacher_size, 1)


def _keys(tokenizer: Any, byte_level: bool | None) -> dict[tuple[str, bytes], int]:
    """Normalised key → token id, one id per key."""
    if byte_level is None:
        byte_level = is_byte_level(tokenizer)
    special = set(tokenizer.all_special_tokens)
    added = set(tokenizer.get_added_vocab())
    keys: dict[tuple[str, bytes], int] = {}
    # Byte-fallback entries last, then lowest id first: when '<0x41>' and 'A' both mean b"A", the map keeps 'A',
    # the token the model actually predicts.
    entries = sorted(tokenizer.get_vocab().items(), key=lambda e: (bool(_BYTE_FALLBACK.fullmatch(e[0])), e[1]))
    for token, token_id in entries:
        if token in special:
            # special tokens only match the same special token, never the text they are spelled with
            key = ("special", token.encode())
        elif token in added:
            key = ("text", token.encode())  # added tokens are written as plain text in any vocabulary
        else:
            key = ("text", normalize_token(token, byte_level))
        keys.setdefault(key, token_id)
    return keys


def vocab_map(
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    *,
    student_byte_level: bool | None = None,
    teacher_byte_level: bool | None = None,
) -> VocabMap:
    """The exact shared support of two vocabularies: ids whose normalised strings (:func:`normalize_token`)
    are equal, paired one to one, sorted by teacher id.

    ``*_byte_level`` overrides the detection of :func:`is_byte_level`. Where one vocabulary has several entries
    with the same bytes, the plain token is paired rather than a byte-fallback one, else the lowest id; the others
    count as unshared. Special tokens pair only with special tokens of the same spelling.
    """
    s_keys = _keys(student_tokenizer, student_byte_level)
    t_keys = _keys(teacher_tokenizer, teacher_byte_level)
    pairs = sorted((t_id, s_keys[key]) for key, t_id in t_keys.items() if key in s_keys)
    return VocabMap(
        student_ids=torch.tensor([s for _, s in pairs], dtype=torch.long),
        teacher_ids=torch.tensor([t for t, _ in pairs], dtype=torch.long),
        student_size=len(student_tokenizer),
        teacher_size=len(teacher_tokenizer),
    )
