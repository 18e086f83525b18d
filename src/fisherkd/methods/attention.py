"""Attention / sequence methods for transformers: TinyBERT hidden-state and attention MSE, MiniLM attention KL.

Tapping a Transformers BERT (checked with transformers 5.x): ``bert.embeddings`` and ``bert.encoder.layer.{i}``
give B×T×D hidden states; ``bert.encoder.layer.{i}.attention.self.query`` / ``.key`` / ``.value`` give the B×T×D
Q/K/V vectors; ``bert.encoder.layer.{i}.attention.self:1`` gives the B×H×T×T attention probabilities. The self-
attention module always returns ``(context, attention)``, but the attention is ``None`` unless the config has
``attn_implementation="eager"`` (the default, "sdpa", never forms it); ``output_attentions=True`` is not needed.
In training mode those probabilities are taken *after* attention dropout, so build the student with
``attention_probs_dropout_prob=0.0`` (the frozen teacher runs in eval mode and is unaffected).

Padding: call the distiller with ``mask=attention_mask`` (B×T, 1 = token); every loss here respects it.
Importance weights: ``weights["token"]`` (B×T) weights every pair's tokens/queries and ``weights["head"]`` ([H])
the heads of every attention-map pair. A ``fisher: {axis: head}`` block estimates head weights from the Fisher of a
per-head gate at the teacher's attention probabilities (the first pair's teacher tap, when it is on the path to the
logits, as the zoo ViT's ``blocks.{i}.attn.probs``; Transformers' returned attention maps are not, so tap the
self-attention context with ``fisher.tap: ...attention.self:0`` and ``fisher.num_heads``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fisherkd import functional as Fn
from fisherkd.methods.base import Hyperparameters, Method, MethodInputs, register


@register("tinybert")
class TinyBERT(Method):
    """TinyBERT intermediate-layer loss: hidden-state MSE through a learned projection + attention-map MSE.

    Each pair is routed by its rank. B×T×D hidden states (``bert.embeddings``, ``bert.encoder.layer.{i}``; with the
    authors' uniform layer map, student layer m ↔ teacher layer m·N/M) give Σ_pairs MSE(H_s·W_h, H_t), where
    W_h is the distiller's adapter (a Linear from the student's width to the teacher's); term ``tinybert_hidden``.
    B×H×T×T attention maps (``...attention.self:1``, equal head counts) are compared as they are, without an
    adapter: Σ_pairs per-head MSE; term ``tinybert_attention``. The authors use pre-softmax scores; Transformers
    gives post-softmax probabilities, which the loss accepts as well (see ``functional.tinybert_attention``).

    Paper: Jiao et al., "TinyBERT: Distilling BERT for Natural Language Understanding", Findings of EMNLP 2020.
    """

    family = "attention"
    paper = "Jiao et al. Findings of EMNLP 2020, arXiv:1909.10351"
    adapter = "student_to_teacher"
    weight_axes = ("head", "token")
    min_pairs = 1
    pair_kinds = ("token", "attention")

    class Params(Hyperparameters):
        pass

    def wants_adapter(self, student_feature: Tensor, teacher_feature: Tensor) -> bool:
        return student_feature.dim() == 3  # hidden states are projected; attention maps must not be mixed

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        head, token = inputs.weights.get("head"), inputs.weights.get("token")
        hidden, attention = [], []
        for s, t in zip(inputs.student_features, inputs.teacher_features):
            if s.dim() == 3:
                hidden.append(Fn.tinybert_hidden(s, t, inputs.mask, token_weight=token))
            elif s.dim() == 4:
                attention.append(Fn.tinybert_attention(s, t, inputs.mask, head_weight=head, token_weight=token))
            else:
                raise ValueError(
                    f"tinybert: a pair gave a student tensor of shape {tuple(s.shape)}; tap hidden states (B×T×D) "
                    "or attention maps (B×H×T×T, e.g. 'encoder.layer.3.attention.self:1')"
                )
        terms = {}  # summed over layers, as the authors do
        if hidden:
            terms["tinybert_hidden"] = torch.stack(hidden).sum()
        if attention:
            terms["tinybert_attention"] = torch.stack(attention).sum()
        return terms


@register("minilm")
class MiniLM(Method):
    """MiniLM self-attention distillation: attention-distribution KL and self-attention relation KL.

    Each pair is routed by its rank. B×H×T×T attention probabilities (``...attention.self:1``, equal head counts)
    give KL(A_t ‖ A_s) per head and query (term ``minilm_attention``). B×T×D vectors (``...attention.self.query``,
    ``.key`` or ``.value``; widths may differ) give the relation KL of softmax(A Aᵀ/√d_r) over
    ``num_relation_heads`` relation heads, independent of the models' head counts (term ``minilm_relation``).
    MiniLM v1: the last layers' attention pair + value pair, relation heads = the models' (equal) head count.
    MiniLMv2: query, key and value pairs of the teacher's upper-middle layer and the student's last layer,
    48 relation heads for base-size teachers (64 for large). Each term is summed over its pairs, as in the papers.
    ``weights["head"]`` applies to the attention pairs only: relation heads are not the models' heads.

    Papers: Wang et al., "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained
    Transformers", NeurIPS 2020; Wang et al., "MiniLMv2: Multi-Head Self-Attention Relation Distillation for
    Compressing Pretrained Transformers", Findings of ACL 2021.
    """

    family = "attention"
    paper = "Wang et al. NeurIPS 2020, arXiv:2002.10957; MiniLMv2, Findings of ACL 2021, arXiv:2012.15828"
    min_pairs = 1
    pair_kinds = ("attention", "token")
    weight_axes = ("head", "token")

    class Params(Hyperparameters):
        num_relation_heads: int = 12

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self._probabilities_checked = False

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        head, token = inputs.weights.get("head"), inputs.weights.get("token")
        attention, relation = [], []
        for s, t in zip(inputs.student_features, inputs.teacher_features):
            if s.dim() == 4:
                self._check_probabilities(s, t, inputs.mask)
                attention.append(Fn.minilm_attention_kl(s, t, inputs.mask, head_weight=head, token_weight=token))
            elif s.dim() == 3:
                r = self.hparams.num_relation_heads
                relation.append(Fn.minilm_relation_kl(s, t, r, inputs.mask, token_weight=token))
            else:
                raise ValueError(
                    f"minilm: a pair gave a student tensor of shape {tuple(s.shape)}; tap attention maps "
                    "(B×H×T×T, e.g. 'encoder.layer.5.attention.self:1') or Q/K/V vectors (B×T×D)"
                )
        terms = {}
        if attention:
            terms["minilm_attention"] = torch.stack(attention).sum()
        if relation:
            terms["minilm_relation"] = torch.stack(relation).sum()
        return terms

    def _check_probabilities(self, student: Tensor, teacher: Tensor, mask: Tensor | None) -> None:
        # Once, in training: attention dropout or pre-softmax scores would silently make the KL meaningless.
        if self._probabilities_checked or not self.training:
            return
        self._probabilities_checked = True
        for role, maps in (("student", student), ("teacher", teacher)):
            rows = maps.detach().float().sum(-1)
            if mask is not None:
                rows = rows[mask.bool()[:, None, :].expand_as(rows)]
            if not torch.allclose(rows, torch.ones_like(rows), atol=2e-2):
                raise ValueError(
                    f"minilm: the {role} attention rows do not sum to 1, so they are not probabilities: set "
                    "attention_probs_dropout_prob=0.0 in the model config (dropout acts on them in training) "
                    "and tap the post-softmax attention ('...attention.self:1' with attn_implementation='eager')"
                )
