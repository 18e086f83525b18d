"""Hugging Face Transformers integration: token-level LM distillation losses and an offline top-k teacher cache."""

from fisherkd.hf.layers import attention_pairs, check_vocabularies, hidden_pairs, layer_map, qkv_pairs
from fisherkd.hf.teacher_cache import CachedTeacher, TopKTeacherBatch, cache_teacher_topk, topk_distillation_loss
from fisherkd.hf.token_losses import DIVERGENCES, Divergence, token_distillation_loss
from fisherkd.hf.trainer import DistillationConfig, DistillationTrainer, TokenLossConfig

__all__ = [
    "DistillationConfig",
    "DistillationTrainer",
    "TokenLossConfig",
    "attention_pairs",
    "check_vocabularies",
    "hidden_pairs",
    "layer_map",
    "qkv_pairs",
    "DIVERGENCES",
    "CachedTeacher",
    "Divergence",
    "TopKTeacherBatch",
    "cache_teacher_topk",
    "token_distillation_loss",
    "topk_distillation_loss",
]
