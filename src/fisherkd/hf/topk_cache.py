"""Offline teacher: run a language model once over a data set, keep each token's top-k log-probabilities.

Distilling from a cache frees the teacher's memory and compute during student training. Per token the cache
keeps the teacher's k largest log-probabilities log p_t,i at temperature τ, their token ids, and a tail
bucket: log(1 − Σ_{top-k} p_t), the mass of the other V − k tokens (computed as a log-sum-exp over those
tokens, so it does not cancel when the top-k hold almost all the mass).

The loss then compares (k+1)-bucket distributions: the teacher's k cached probabilities plus its tail, and the
student's probabilities of the same k tokens plus its own tail 1 − Σ_{top-k} p_s. With k = V the tail buckets
are empty and the loss equals the online :func:`~fisherkd.hf.token_losses.token_distillation_loss`. With k < V
it is the divergence between the bucketed distributions: a lower bound on the full one (merging outcomes never
increases an f-divergence), blind to how the student spreads its tail mass among the tail tokens.

Storage is a directory: ``meta.json`` (k, temperature, vocabulary size, number of batches; written last, so a
directory without it is an unfinished cache) and one tensor file per batch, ``batch_000000.safetensors`` when
the safetensors package is installed, else ``batch_000000.pt`` saved by ``torch.save`` as a plain dict of
tensors and read back with ``torch.load(weights_only=True)``. Nothing else is ever unpickled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from fisherkd.functional.logits import _log_probs
from fisherkd.hf.token_losses import (
    LOG_FLOOR,
    Divergence,
    accumulation_dtype,
    check_divergence,
    chunk_rows,
    chunked_token_loss,
    divergence_and_h,
    loss_scale,
    select_tokens,
    softmax_backward,
)

try:
    import safetensors.torch as _safetensors
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    _safetensors = None

__all__ = ["CachedTeacher", "TopKTeacherBatch", "cache_teacher_topk", "teacher_topk", "topk_distillation_loss"]

FORMAT = "fisherkd-topk-teacher"
VERSION = 1


@dataclass
class TopKTeacherBatch:
    """One batch of cached teacher outputs, aligned with the logits positions of its input_ids [B, T]."""

    indices: Tensor  # [B, T, k] token ids of the teacher's k most probable next tokens, most probable first
    logprobs: Tensor  # [B, T, k] their log-probabilities at the cache's temperature
    tail_logprob: Tensor  # [B, T] log of the remaining mass 1 − Σ_top-k p_t (−inf when k = V)
    input_ids: Tensor | None = None  # [B, T] the inputs the teacher saw, to check the replay order

    def to(self, device: torch.device | str) -> TopKTeacherBatch:
        move = None if self.input_ids is None else self.input_ids.to(device)
        return TopKTeacherBatch(self.indices.to(device), self.logprobs.to(device), self.tail_logprob.to(device), move)


def teacher_topk(
    teacher_logits: Tensor, k: int, temperature: float = 1.0, chunk_size: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k (indices [..., k], log-probabilities [..., k]) of softmax(z/τ) and the tail log-mass [...],
    computed ``chunk_size`` rows at a time (default: 8 MiB of fp32 per chunk, as the token losses) so the fp32
    log-probabilities of all tokens are never held at once."""
    vocab = teacher_logits.shape[-1]
    chunk_size = chunk_rows(chunk_size, vocab)
    if not 1 <= k <= vocab:
        raise ValueError(f"k must lie between 1 and the vocabulary size {vocab}, got {k}")
    flat = teacher_logits.detach().reshape(-1, vocab)
    indices, logprobs, tails = [], [], []
    for start in range(0, flat.shape[0], chunk_size):
        log_p = _log_probs(flat[start : start + chunk_size], temperature)
        top, idx = log_p.topk(k, dim=-1)
        tails.append(log_p.scatter_(-1, idx, -math.inf).logsumexp(-1))  # mass of the tokens outside the top k
        indices.append(idx)
        logprobs.append(top)
    lead = teacher_logits.shape[:-1]
    return (
        torch.cat(indices).reshape(*lead, k),
        torch.cat(logprobs).reshape(*lead, k),
        torch.cat(tails).reshape(lead),
    )


def _save(tensors: dict[str, Tensor], path: Path) -> None:
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    if _safetensors is not None:
        _safetensors.save_file(tensors, str(path.with_suffix(".safetensors")))
    else:
        torch.save(tensors, path.with_suffix(".pt"))


def _load(path: Path) -> dict[str, Tensor]:
    if path.with_suffix(".safetensors").exists():
        if _safetensors is None:
            raise ImportError(f"{path.with_suffix('.safetensors')} needs the safetensors package to be read")
        return _safetensors.load_file(str(path.with_suffix(".safetensors")))
    return torch.load(path.with_suffix(".pt"), map_location="cpu", weights_only=True)


def _batch_file(directory: Path, i: int) -> Path:
    return directory / f"batch_{i:06d}"  # suffix added by _save / _load


@torch.no_grad()
def cache_teacher_topk(
    teacher: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    path: str | Path,
    k: int = 64,
    temperature: float = 1.0,
    *,
    chunk_size: int | None = None,
    overwrite: bool = False,
) -> CachedTeacher:
    """Run ``teacher`` (eval mode, no gradients) once over ``batches`` and store its top-k next-token
    log-probabilities at ``temperature`` per token, with a tail bucket, under the directory ``path``.

    Each batch is a mapping with ``input_ids`` [B, T] and optionally ``attention_mask`` (passed to the teacher;
    other keys such as ``labels`` are ignored: masking happens in the loss). The teacher is called as
    ``teacher(input_ids=..., attention_mask=...)`` and may return logits or an output with ``.logits``
    (Hugging Face). Replay the same batches in the same order when training from the cache.
    """
    directory = Path(path)
    if (directory / "meta.json").exists() and not overwrite:
        raise FileExistsError(f"{directory} already holds a top-k logits cache; pass overwrite=True to replace it")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "meta.json").unlink(missing_ok=True)
    for stale in [*directory.glob("batch_*.safetensors"), *directory.glob("batch_*.pt")]:
        stale.unlink()

    was_training = teacher.training
    teacher.eval()
    device = next(teacher.parameters()).device
    vocab = None
    count = 0
    try:
        for batch in batches:
            inputs = {key: batch[key].to(device) for key in ("input_ids", "attention_mask") if key in batch}
            output = teacher(**inputs)
            logits = output.logits if hasattr(output, "logits") else output
            vocab = logits.shape[-1]
            indices, logprobs, tail = teacher_topk(logits, k, temperature, chunk_size)
            _save(
                {
                    "indices": indices.to(torch.int32),  # token ids fit 31 bits: half of int64
                    "logprobs": logprobs,
                    "tail_logprob": tail,
                    "input_ids": batch["input_ids"],
                },
                _batch_file(directory, count),
            )
            count += 1
    finally:
        teacher.train(was_training)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "k": k,
        "temperature": temperature,
        "vocab_size": vocab,
        "num_batches": count,
    }
    (directory / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return CachedTeacher(directory)


class CachedTeacher:
    """A top-k logits cache written by :func:`cache_teacher_topk`: ``len``, indexing and iteration give
    :class:`TopKTeacherBatch` objects (on the CPU), batch i being the i-th batch the teacher saw."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.exists():
            raise FileNotFoundError(
                f"{meta_file} not found: not a finished top-k logits cache (see cache_teacher_topk)"
            )
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{meta_file} is not a {FORMAT} cache of version {VERSION}")
        self.k: int = meta["k"]
        self.temperature: float = meta["temperature"]
        self.vocab_size: int | None = meta["vocab_size"]
        self.num_batches: int = meta["num_batches"]

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, i: int) -> TopKTeacherBatch:
        return self.batch(i)

    def __iter__(self) -> Iterator[TopKTeacherBatch]:
        return (self.batch(i) for i in range(self.num_batches))

    def batch(self, i: int, input_ids: Tensor | None = None) -> TopKTeacherBatch:
        """Batch ``i``; given the student's ``input_ids``, check that they are the ones the teacher saw."""
        if not -self.num_batches <= i < self.num_batches:
            raise IndexError(f"batch {i} out of range: the cache holds {self.num_batches} batches")
        tensors = _load(_batch_file(self.path, i % self.num_batches))
        cached = TopKTeacherBatch(
            tensors["indices"], tensors["logprobs"], tensors["tail_logprob"], tensors.get("input_ids")
        )
        seen = cached.input_ids
        if input_ids is not None and seen is not None and not torch.equal(input_ids.cpu().long(), seen.long()):
            raise ValueError(
                f"batch {i} of the top-k logits cache was made from other input_ids than the ones given: replay the "
                "cached batches in the order they were cached (no shuffling, same batch size and padding)"
            )
        return cached

    def loss(self, student_logits: Tensor, cached: TopKTeacherBatch, labels: Tensor, **kwargs) -> Tensor:
        """:func:`topk_distillation_loss` against ``cached``, at the temperature the cache was made with."""
        cached = cached.to(student_logits.device)
        return topk_distillation_loss(
            student_logits,
            cached.indices,
            cached.logprobs,
            cached.tail_logprob,
            labels,
            temperature=self.temperature,
            **kwargs,
        )


def topk_distillation_loss(
    student_logits: Tensor,
    cached_indices: Tensor,
    cached_logprobs: Tensor,
    tail_logprob: Tensor,
    labels: Tensor,
    divergence: Divergence = "forward_kl",
    temperature: float = 1.0,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    chunk_size: int | None = None,
    shift: bool = True,
    ignore_index: int = -100,
    token_weight: Tensor | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    num_items: int | float | Tensor | None = None,
) -> Tensor:
    """Token-level distillation against a sparse (top-k + tail) teacher: the divergence of
    :func:`~fisherkd.hf.token_losses.token_distillation_loss`, with every option and reduction as there,
    between the (k+1)-bucket distributions

        q_t = [p_t,i1 … p_t,ik, tail_t]            (cached, ``temperature`` must be the cache's)
        q_s = [p_s,i1 … p_s,ik, 1 − Σ_j p_s,ij]    (p_s = softmax(z_s/τ), same k token ids; distinct ids)

    ``cached_indices``/``cached_logprobs`` are [B, T, k] and ``tail_logprob`` [B, T], aligned with the student
    logits' positions. Gradient to the student logits through the bucketing: a top-k token gets the softmax
    gradient of its bucket, h_b, and a tail token c gets the tail bucket's h_tail in proportion p_s,c/q_s,tail;
    then the softmax projection as in the online loss. Memory is bounded by chunking as there.
    """
    check_divergence(divergence, beta, alpha)
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    if cached_indices.shape[:-1] != lead or cached_logprobs.shape != cached_indices.shape or tail_logprob.shape != lead:
        raise ValueError(
            f"cached indices {tuple(cached_indices.shape)}, log-probabilities {tuple(cached_logprobs.shape)} and "
            f"tail {tuple(tail_logprob.shape)} must be [*{tuple(lead)}, k], [*{tuple(lead)}, k] and {tuple(lead)} "
            f"to match student logits {tuple(student_logits.shape)}"
        )
    if labels.shape != lead:
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {tuple(lead)}")
    if cached_indices.numel() and int(cached_indices.max()) >= vocab:
        raise ValueError(
            f"the cached teacher has token id {int(cached_indices.max())} but the student vocabulary size is {vocab}"
        )
    k = cached_indices.shape[-1]
    indices = cached_indices.reshape(-1, k)
    teacher = torch.cat([cached_logprobs.reshape(-1, k), tail_logprob.reshape(-1, 1)], dim=-1)
    scale = loss_scale(divergence, temperature)

    def chunk_fn(student: Tensor, r: Tensor, want_grad: bool) -> tuple[Tensor, Tensor | None]:
        idx = indices[r].long()
        log_p_s = _log_probs(student[r], temperature)
        log_q_t = teacher[r].to(log_p_s.dtype).clamp_min_(LOG_FLOOR)
        outside = log_p_s.scatter(-1, idx, -math.inf)  # the student's log-probabilities of the tail tokens only
        log_tail_s = outside.logsumexp(-1, keepdim=True).clamp_min_(LOG_FLOOR)
        log_q_s = torch.cat([log_p_s.gather(-1, idx), log_tail_s], dim=-1).clamp_min_(LOG_FLOOR)
        value, h = divergence_and_h(log_q_s, log_q_t, divergence, beta, alpha)
        if not want_grad:
            return value * scale, None
        # p_s,c·∂ℓ/∂p_s,c per token: a tail token's share p_s,c/q_tail of h_tail (≤ 1, 0 at the top-k ids) ...
        grad = outside.sub_(log_tail_s).exp_().mul_(h[:, -1:])
        grad.scatter_(-1, idx, h[:, :-1])  # ... and a top-k token's own bucket value
        return value * scale, softmax_backward(grad, log_p_s.exp_(), scale / temperature)

    rows, weight = select_tokens(
        labels, shift, ignore_index, token_weight, reduction, num_items, accumulation_dtype(student_logits)
    )
    return chunked_token_loss(student_logits, rows, weight, chunk_fn, chunk_size)
