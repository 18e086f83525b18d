"""Hugging Face Transformers integration: a ``DistillationTrainer``, layer maps for hidden/attention transfer,
token-level LM distillation losses with bounded memory, mixed-policy (on-policy, sequence-level) completions
(``policy``), distillation across tokenizers (``cross_tokenizer``: alignment by text, ULD, span-aligned KL) and an
offline cache of the teacher's top-k logits (``topk_cache``; not the cache of trained teacher
models under ``FISHERKD_CACHE``).

The trainer is imported on first use, so the losses and the cache work without importing ``transformers``.
"""

from typing import Any

from fisherkd.hf.alignment import align_texts, vocab_map
from fisherkd.hf.cross_tokenizer import CrossTokenizerConfig, align_batch
from fisherkd.hf.layers import attention_pairs, check_vocabularies, hidden_pairs, layer_map, qkv_pairs
from fisherkd.hf.policy import MixedPolicy, PolicyConfig, generate_completions
from fisherkd.hf.token_losses import DIVERGENCES, Divergence, token_distillation_loss
from fisherkd.hf.topk_cache import CachedTeacher, TopKTeacherBatch, cache_teacher_topk, topk_distillation_loss

_TRAINER_NAMES = ("DistillationConfig", "DistillationTrainer", "TokenLossConfig")


def __getattr__(name: str) -> Any:
    if name in _TRAINER_NAMES:
        from fisherkd.hf import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'fisherkd.hf' has no attribute {name!r}")


__all__ = [
    "DIVERGENCES",
    "CachedTeacher",
    "CrossTokenizerConfig",
    "DistillationConfig",
    "DistillationTrainer",
    "Divergence",
    "MixedPolicy",
    "PolicyConfig",
    "TokenLossConfig",
    "TopKTeacherBatch",
    "align_batch",
    "align_texts",
    "attention_pairs",
    "cache_teacher_topk",
    "generate_completions",
    "check_vocabularies",
    "hidden_pairs",
    "layer_map",
    "qkv_pairs",
    "token_distillation_loss",
    "topk_distillation_loss",
    "vocab_map",
]
