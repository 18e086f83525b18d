"""``DistillationTrainer``: a Hugging Face ``Trainer`` that distils a frozen teacher into the model it trains.

It builds a :class:`~fisherkd.distiller.Distiller` over (student = ``trainer.model``, teacher), so every registered
method, tap and adapter works as in the rest of FisherKD, and adds for causal LMs the chunked token-level loss of
:func:`fisherkd.hf.token_distillation_loss`. Example (TinyBERT-style intermediate transfer + logit KD)::

    from fisherkd.hf import DistillationConfig, DistillationTrainer, attention_pairs, hidden_pairs

    teacher = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager")
    pairs = hidden_pairs(student, teacher, "uniform") + attention_pairs(student, teacher, "uniform")
    config = DistillationConfig(methods=[{"name": "tinybert", "pairs": pairs}, "kd", "ce"])
    trainer = DistillationTrainer(model=student, teacher_model=teacher, distillation=config,
                                  args=TrainingArguments("out"), train_dataset=train)
    trainer.train()

For a causal LM, ``DistillationConfig(token_loss={"divergence": "reverse_kl"}, label_loss_weight=0.5)`` scores
every labelled token against the teacher's next-token distribution. A teacher with another tokenizer:
``DistillationConfig(cross_tokenizer={"loss": "uld"})`` (or ``"span_kl"``, ``"dskd"``) with
``teacher_processing_class=teacher_tokenizer`` (see :mod:`fisherkd.hf.cross_tokenizer`).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback
from transformers.loss.loss_utils import ForCausalLMLoss, ForSequenceClassificationLoss
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

try:  # Transformers >= 5: logits_to_keep may be a boolean [batch, tokens] mask
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:
    slice_logits_to_keep = None
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.training_args import ParallelMode

from fisherkd.core import model_logits, nearest
from fisherkd.distiller import Distiller, MethodSpec, as_spec
from fisherkd.functional.cross_tokenizer import dskd_loss, span_kl_loss, uld_loss
from fisherkd.hf.alignment import vocab_map
from fisherkd.hf.cross_tokenizer import DEFAULT_LABEL_WEIGHTS, CrossTokenizerConfig, DualSpaceProjectors, align_batch
from fisherkd.hf.layers import check_vocabularies, vocab_size
from fisherkd.hf.policy import MixedPolicy, PolicyConfig
from fisherkd.hf.token_losses import (
    DIVERGENCES,
    check_divergence,
    chunk_rows,
    hidden_token_distillation_loss,
    token_distillation_loss,
)
from fisherkd.methods import method_class

__all__ = [
    "CrossTokenizerConfig",
    "DISTILLER_STATE_NAME",
    "POLICY_STATE_NAME",
    "PROJECTORS_STATE_NAME",
    "DistillationConfig",
    "DistillationTrainer",
    "PolicyConfig",
    "TokenLossConfig",
]

# A dataset column with each example's index, passed to the methods (CRD's memory bank) and kept by the Trainer.
INDEX_COLUMN = "index"
# The adapters' and methods' state (learned projections, Fisher statistics) inside every Trainer checkpoint.
DISTILLER_STATE_NAME = "fisherkd_distiller.pt"
# The mixed policy's state (DistiLLM threshold, replay buffer, source counts) inside every Trainer checkpoint.
POLICY_STATE_NAME = "fisherkd_policy.pt"
# DSKD's projectors between the two hidden spaces (cross_tokenizer loss "dskd") inside every Trainer checkpoint.
PROJECTORS_STATE_NAME = "fisherkd_projectors.pt"
# Batch entries added by the cross-tokenizer alignment (see fisherkd.hf.cross_tokenizer.align_batch); the number
# of aligned pairs of the whole accumulated batch, counted in get_batch_samples, normalises the loss.
ALIGNMENT_KEYS = ("teacher_input_ids", "teacher_attention_mask", "aligned_positions")
ALIGNED_ROWS_KEY = "aligned_rows_in_batch"

# Config fields of LM heads that scale or cap the logits after the linear map (Gemma's soft-capping, Cohere's
# logit_scale, Granite's logits_scaling, ...): such models keep the logits path (see _plain_head).
LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
    "lm_head_multiplier",
)

Task = Literal["auto", "causal_lm", "sequence_classification"]
TASKS: tuple[str, ...] = get_args(Task)
TEACHER_DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class TokenLossConfig:
    """Token-level distillation for causal LMs (see :func:`fisherkd.hf.token_distillation_loss`): the
    ``divergence`` between the student's and teacher's next-token distributions at temperature τ, on every
    token whose label is not -100, computed ``chunk_size`` tokens at a time."""

    weight: float = 1.0
    divergence: str = "forward_kl"
    temperature: float = 1.0
    chunk_size: int | None = None  # tokens per chunk; None: as many as make 8 MiB fp32 [chunk × V] tensors
    beta: float = 0.5  # JSD interpolation, 0 < β < 1, as in GKD/TRL
    alpha: float = 0.1  # skew of the skew KLs
    vocab_truncation: bool = False  # allow padded embedding matrices of one tokenizer (first min(V_s, V_t) entries)

    def __post_init__(self) -> None:
        # Every field is checked here, so that a typo fails when the config is built, not at the first step.
        if self.divergence not in DIVERGENCES:
            raise ValueError(
                f"token_loss divergence {self.divergence!r} is unknown; {nearest(self.divergence, DIVERGENCES)}"
            )
        _check_number("token_loss weight", self.weight, minimum=0.0)
        _check_number("token_loss temperature", self.temperature, minimum=0.0, strict=True)
        _check_number("token_loss alpha", self.alpha, minimum=0.0, maximum=1.0)
        _check_number("token_loss beta", self.beta, minimum=0.0, maximum=1.0)
        try:
            check_divergence(self.divergence, self.beta, self.alpha)
            chunk_rows(self.chunk_size, 1)
        except ValueError as err:
            raise ValueError(f"token_loss: {err}") from None
        if not isinstance(self.vocab_truncation, bool):
            raise ValueError(f"token_loss vocab_truncation must be True or False, got {self.vocab_truncation!r}")

    def loss_arguments(self) -> dict[str, Any]:
        """The arguments the token losses (logits and fused head alike) take from this config."""
        return {
            "divergence": self.divergence,
            "temperature": self.temperature,
            "beta": self.beta,
            "alpha": self.alpha,
            "chunk_size": self.chunk_size,
            "vocab_truncation": self.vocab_truncation,
        }

    @classmethod
    def from_mapping(cls, fields: Mapping[str, Any]) -> TokenLossConfig:
        """A config from a dict of its fields; an unknown key fails with the nearest field names."""
        known = [f.name for f in dataclasses.fields(cls)]
        for key in fields:
            if key not in known:
                raise ValueError(f"token_loss has no field {key!r}; {nearest(str(key), known)}")
        return cls(**fields)


def _check_number(what: str, value: Any, minimum: float, maximum: float = math.inf, strict: bool = False) -> None:
    """A real number within [minimum, maximum] (or above minimum when ``strict``), else a one-line ValueError."""
    low = "> " if strict else ">= "
    bound = f"{low}{minimum:g}" if maximum == math.inf else f"in [{minimum:g}, {maximum:g}]"
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value < minimum or value > maximum or (strict and value == minimum):
        raise ValueError(f"{what} must be a number {bound}, got {value!r}")


@dataclass
class DistillationConfig:
    """What to distil, next to the ``TrainingArguments`` that say how to train.

    - ``methods``: method specs as for :class:`~fisherkd.distiller.Distiller` (``{"name": "tinybert", "weight":
      1.0, "pairs": [[student_tap, teacher_tap]], **hyper-parameters}``, or just a name). Labels reach them as the
      target for sequence classification; causal LMs get their labels through ``label_loss_weight``.
    - ``token_loss``: causal LMs only; a :class:`TokenLossConfig` or a dict of its fields.
    - ``label_loss_weight``: weight of the student's own task loss (Hugging Face's cross-entropy, regression or
      multi-label loss); 0 leaves it out (for classification the ``ce`` method is the usual way to add it).
      None (the default) is 0, except with ``cross_tokenizer``: the authors' (ULD 1, GOLD's span_kl 0).
    - ``cross_tokenizer``: causal LMs whose tokenizers differ: a
      :class:`~fisherkd.hf.cross_tokenizer.CrossTokenizerConfig` or a dict of its fields (``{"loss": "uld"}``,
      ``{"loss": "span_kl"}`` or ``{"loss": "dskd"}``); the trainer then needs ``processing_class`` and
      ``teacher_processing_class``. It replaces ``token_loss`` (which needs one vocabulary) and takes no
      ``methods`` (the teacher reads other ids).
    - ``policy``: causal LMs only; where completions come from (data, the student on-policy, the teacher,
      DistiLLM's adaptive replay): a :class:`~fisherkd.hf.policy.PolicyConfig` or a dict of its fields.
    - ``teacher_dtype``: cast the frozen teacher, e.g. ``"bfloat16"`` to halve its memory; None keeps it.
    - ``task``: ``"auto"`` tells a causal LM by its class (Transformers' causal-LM mapping).
    """

    methods: list[Any] = field(default_factory=list)
    token_loss: TokenLossConfig | Mapping[str, Any] | None = None
    label_loss_weight: float | None = None
    policy: PolicyConfig | Mapping[str, Any] | None = None
    teacher_dtype: Literal["bfloat16", "float16", "float32"] | None = None
    task: Task = "auto"
    cross_tokenizer: CrossTokenizerConfig | Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.token_loss, Mapping):
            self.token_loss = TokenLossConfig.from_mapping(self.token_loss)
        elif self.token_loss is not None and not isinstance(self.token_loss, TokenLossConfig):
            raise ValueError(
                f"token_loss must be a TokenLossConfig, a dict of its fields or None, got {self.token_loss!r}"
            )
        if isinstance(self.policy, Mapping):
            self.policy = PolicyConfig.from_mapping(self.policy)
        elif self.policy is not None and not isinstance(self.policy, PolicyConfig):
            raise ValueError(f"policy must be a PolicyConfig, a dict of its fields or None, got {self.policy!r}")
        if isinstance(self.cross_tokenizer, Mapping):
            self.cross_tokenizer = CrossTokenizerConfig.from_mapping(self.cross_tokenizer)
        elif self.cross_tokenizer is not None and not isinstance(self.cross_tokenizer, CrossTokenizerConfig):
            raise ValueError(
                "cross_tokenizer must be a CrossTokenizerConfig, a dict of its fields or None, got "
                f"{self.cross_tokenizer!r}"
            )
        if self.label_loss_weight is None:
            self.label_loss_weight = DEFAULT_LABEL_WEIGHTS[self.cross_tokenizer.loss] if self.cross_tokenizer else 0.0
        self.methods = [as_spec(m) for m in self.methods]
        for spec in self.methods:
            # an unknown name or hyper-parameter fails here, with suggestions, rather than inside the Trainer
            spec.build()
            if spec.weight is not None:
                _check_number(f"the weight of method {spec.name!r}", spec.weight, minimum=0.0)
        _check_number("label_loss_weight", self.label_loss_weight, minimum=0.0)
        if self.teacher_dtype not in (None, *TEACHER_DTYPES):
            raise ValueError(
                f"teacher_dtype {self.teacher_dtype!r} is unknown; {nearest(str(self.teacher_dtype), TEACHER_DTYPES)}"
                " (or None to keep the teacher's)"
            )
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is unknown; {nearest(str(self.task), TASKS)}")
        if self.cross_tokenizer is not None:
            if self.token_loss is not None:
                raise ValueError(
                    "cross_tokenizer replaces token_loss (which compares distributions over one vocabulary): "
                    "leave token_loss out"
                )
            if self.methods:
                raise ValueError(
                    "cross_tokenizer takes no methods: the teacher reads its own token ids, so the two models' "
                    "layers do not line up position by position; leave methods out"
                )
            if self.policy is not None and self.policy.teacher_fraction > 0:
                raise ValueError(
                    "policy teacher_fraction > 0 (sequence-level KD) is not supported with cross_tokenizer: the "
                    "teacher would be prompted with student token ids; use student_fraction or adaptive"
                )
        elif not self.methods and self.token_loss is None and self.label_loss_weight == 0:
            raise ValueError(
                "DistillationConfig has nothing to train with: give methods, token_loss, cross_tokenizer or "
                "label_loss_weight"
            )


def _rank(mask: Tensor) -> Tensor:
    """For a boolean [B, T] mask, each position's index among the True positions in row-major order (the row of
    ``hidden[mask]``, as ``logits_to_keep`` returns them); -1 elsewhere."""
    return (mask.flatten().long().cumsum(0) - 1).view_as(mask).masked_fill(~mask, -1)


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The Transformers model inside a PEFT wrapper (``PeftModel.base_model.model``), else the model itself."""
    base = getattr(model, "base_model", None)
    inner = getattr(base, "model", None)
    return inner if inner is not None and type(model).__name__.startswith("Peft") else model


def _plain_head(model: nn.Module) -> bool:
    """Whether a causal LM's logits are its backbone's last hidden state through a plain ``nn.Linear`` head (no
    logit scaling or capping after it, no prompt-learning PEFT adapter before it), so that the token loss may make
    them itself, chunk by chunk, from ``model.base_model``'s output."""
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        return False
    inner = _unwrap_peft(model)
    get_head = getattr(inner, "get_output_embeddings", None)
    config = getattr(inner, "config", None)
    if get_head is None or config is None or getattr(inner, "base_model", inner) is inner:
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return type(get_head()) is nn.Linear and all(getattr(text, name, None) is None for name in LOGIT_TRANSFORMS)


def _is_causal_lm(model: nn.Module, task: Task) -> bool:
    if task != "auto":
        return task == "causal_lm"
    return type(_unwrap_peft(model)).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def _broadcast_from_first_process(modules: list[nn.Module]) -> None:
    """Overwrite every process's parameters and buffers of ``modules`` with process 0's (in place)."""
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.numel():
                dist.broadcast(tensor.data, src=0)


def _average_gradients(parameters: list[nn.Parameter], bucket_elements: int = 2**24) -> None:
    """g ← (1/P)·Σ_processes g for every parameter, in place, as DDP averages the gradients of the modules it wraps.

    A parameter that has a gradient on some processes but not on others counts as a zero gradient on the others;
    one with no gradient on any process keeps none (so the optimizer skips it, as in one process). Gradients are
    summed in flat buckets of at most ``bucket_elements`` per device and dtype: a few collectives, not one per
    tensor.
    """
    device = parameters[0].device
    present = torch.tensor([float(p.grad is not None) for p in parameters], device=device)
    dist.all_reduce(present)
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p, anywhere in zip(parameters, present.tolist()):
        if not anywhere:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    world = dist.get_world_size()
    for grads in groups.values():
        start = 0
        while start < len(grads):
            end, size = start, 0
            while end < len(grads) and (end == start or size + grads[end].numel() <= bucket_elements):
                size += grads[end].numel()
                end += 1
            bucket = grads[start:end]
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat.div_(world)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            start = end


def _shard_for_inference(module: nn.Module, accelerator: Any) -> nn.Module:
    """``module`` sharded over the processes by the accelerator's FSDP plugin (FSDP1 or FSDP2), frozen and in eval.

    Accelerate's ``prepare_model(module, evaluation_mode=True)`` would not shard it (evaluation mode skips the FSDP
    wrapping), and ``prepare`` wraps for training; so the module is sharded here as ``prepare`` shards the student
    (FSDP2: accelerate's ``fsdp2_prepare_model``, one unit per layer; FSDP1: the plugin's ``FullyShardedDataParallel``
    settings) but with a copy of the plugin: the plugin fixes its layer classes on the first model it wraps, and
    they must be the student's, found when the Trainer prepares it.
    """
    shared = accelerator.state.fsdp_plugin
    plugin = copy.copy(shared)
    if plugin.fsdp_version == 2:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        accelerator.state.fsdp_plugin = plugin  # fsdp2_prepare_model reads (and updates) the accelerator's plugin
        try:
            module = fsdp2_prepare_model(accelerator, module)
        finally:
            accelerator.state.fsdp_plugin = shared
        # the root and the LM head stay gathered after a forward pass, for the backward that a teacher never runs
        module.set_reshard_after_forward(True)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel

        plugin.set_auto_wrap_policy(module)
        module = FullyShardedDataParallel(
            module,
            sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
            cpu_offload=plugin.cpu_offload,
            auto_wrap_policy=plugin.auto_wrap_policy,
            mixed_precision=plugin.mixed_precision_policy,
            sync_module_states=plugin.sync_module_states,
            forward_prefetch=plugin.forward_prefetch,
            use_orig_params=plugin.use_orig_params,
            param_init_fn=plugin.param_init_fn,
            ignored_modules=plugin.ignored_modules,
            limit_all_gathers=plugin.limit_all_gathers,
            device_id=accelerator.device,
        )
    # loading rank 0's weights into the others (cpu_ram_efficient_loading) makes new, trainable parameters
    module.requires_grad_(False)
    return module.eval()


class _DistillerCallback(TrainerCallback):
    """The distiller's clock follows the Trainer's: at the start, the epoch length (optimizer steps per epoch,
    counted as the Trainer counts them) and the steps already taken (on resume); after each optimizer step, clear
    the adapters' gradients (the Trainer zeroes only the student's) and advance the distiller (its clock, Fisher
    statistics, EMA teachers)."""

    def __init__(self, trainer: DistillationTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        distiller = self.trainer.distiller
        if distiller is None:
            return
        try:
            batches = len(train_dataloader)
        except TypeError:  # an iterable dataset: the run's length in steps is all we know
            batches = None
        if batches:
            steps_per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
        else:
            steps_per_epoch = max(state.max_steps / max(state.num_train_epochs, 1), 1)
        distiller.clock.configure(steps_per_epoch, step=state.global_step)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        policy = self.trainer.policy
        if policy is not None and policy.config.adaptive and metrics and "eval_loss" in metrics:
            policy.observe_validation_loss(metrics["eval_loss"])

    def on_optimizer_step(self, args, state, control, **kwargs):
        for p in self.trainer.distiller_parameters():
            p.grad = None
        if self.trainer.distiller is not None:
            self.trainer.distiller.after_optimizer_step()


class DistillationTrainer(Trainer):
    """A ``transformers.Trainer`` that trains ``model`` (the student) from a frozen ``teacher_model``.

    The teacher is put in eval mode with ``requires_grad=False``, moved to the student's device and optionally
    cast (``teacher_dtype``). Adapters and method parameters are optimised with the student (the Trainer's own
    optimizer construction runs over all of them: same learning rate and weight-decay rules), clipped with it, and
    saved in every checkpoint as ``fisherkd_distiller.pt`` with the Fisher statistics, so
    ``train(resume_from_checkpoint=...)`` restores them. Every loss term and Fisher diagnostic is logged
    (``distill/<term>``, mean since the last log) to whatever ``report_to`` names. Without ``distillation``, a
    causal LM gets the forward-KL token loss and any other model logit KD (``kd``).

    Loss normalisation under gradient accumulation: per-batch terms (all methods, the classification label loss)
    are divided by the number of accumulated micro-batches, as the Trainer does for a mean loss; token-level terms
    are summed and divided by the number of labelled tokens of the whole accumulated batch (``num_items_in_batch``),
    so they equal the per-token mean over that batch however the tokens fall into micro-batches; they are logged
    as that mean too (``distill/token``, ``distill/label`` for a causal LM), whatever the accumulation.

    Across tokenizers (``cross_tokenizer``, with ``teacher_processing_class=``), each accumulated batch is aligned
    by text after on-policy generation (:mod:`fisherkd.hf.cross_tokenizer`): the teacher runs on its own tokens of
    the student's decoded rows, and the loss is summed over the aligned completion positions and divided by their
    number in the whole accumulated batch (logged as that mean, ``distill/uld``, ``distill/span_kl`` or
    ``distill/dskd``). DSKD's projectors (``trainer.dskd_projectors``) are trained, clipped and checkpointed
    (``fisherkd_projectors.pt``) like the adapters.

    On a causal LM the logit-family methods (``kd``, ``jsd``, ``dkd``, ...) are refused: they score one
    distribution per example, and on [batch, tokens, vocab] logits they would score every position, pads and
    prompts included, at their image-classification defaults (τ = 4). The token-level loss (``token_loss``) is
    their masked, per-token form; feature, attention and relation methods (``minilm``, ``tinybert``) work as usual.

    ``example_input`` (a batch dict) sizes the adapters; by default the first two training examples are used.
    The distiller's forward hooks stay on both models until ``trainer.distiller.close()``.

    Under DDP (``torchrun``, ``accelerate launch``), the adapters, the methods' parameters and buffers and DSKD's
    projectors are copied from process 0 when they are built, and their gradients are averaged over the processes
    once per optimizer step, before clipping (see :func:`_average_gradients`); so are the student's when methods
    are given, since the distiller calls the student outside the DDP wrapper, whose own averaging then never runs.
    Fisher statistics (the EMA axes class, channel, head, parameter, direction) are all-reduced by the weighters
    themselves, so every process weights alike; per-batch axes (sample, position, token) are estimated on each
    process's own rows. The logged terms (``distill/<term>``) are averaged over the processes, like the loss. FSDP
    and DeepSpeed are refused with methods or DSKD.

    Under FSDP (``fsdp=True``, ``fsdp_config=``) the teacher is sharded like the student, with the same plugin
    settings (see :func:`_shard_for_inference`): each process holds 1/P of its weights, and its layers are gathered
    one at a time in its forward passes, which run in eval mode under no_grad; under DDP it stays a whole copy per
    process, not wrapped. Sequence-level KD (``policy`` teacher_fraction > 0) is refused under FSDP, and DeepSpeed
    ZeRO-3 altogether; under ZeRO-1/2 the teacher is copied to each device.
    """

    # compute_loss returns a loss already scaled for gradient accumulation (see the class docstring)
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher_model: nn.Module | None = None,
        distillation: DistillationConfig | None = None,
        *args: Any,
        example_input: Mapping[str, Tensor] | None = None,
        teacher_processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        if teacher_model is None:
            raise ValueError("DistillationTrainer needs teacher_model=")
        if kwargs.get("model_init") is not None:
            raise ValueError("DistillationTrainer does not support model_init: the distiller is built around `model`")
        super().__init__(model, *args, **kwargs)
        self.causal_lm = _is_causal_lm(self.model, distillation.task if distillation else "auto")
        default = DistillationConfig(token_loss={}) if self.causal_lm else DistillationConfig(methods=["kd"])
        self.distillation = config = distillation or default
        if config.methods and (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            raise NotImplementedError(
                "DistillationTrainer with methods supports DDP but not FSDP or DeepSpeed: the distiller taps and "
                "calls the unsharded student. Use token_loss / label_loss_weight only, or plain DDP"
            )
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            raise NotImplementedError(
                "DistillationTrainer does not shard the teacher under DeepSpeed ZeRO-3 (a teacher loaded under it "
                "holds only its partition): use FSDP, which shards it (fsdp=True, fsdp_config={'fsdp_version': 2}), or "
                "ZeRO stage 1 or 2, which copies it to each device"
            )
        if self.is_fsdp_enabled and config.policy is not None and config.policy.teacher_fraction > 0:
            raise NotImplementedError(
                "policy teacher_fraction > 0 (sequence-level KD) is not supported under FSDP: the sharded teacher "
                "would generate without synchronised steps, and a process whose rows end first would leave the others "
                "waiting; generate the teacher's completions beforehand, or train under DDP"
            )
        self.teacher_model = teacher_model
        self._prepare_teacher()
        self.teacher_processing_class = teacher_processing_class
        self.shared_vocab = None
        self.dskd_projectors: DualSpaceProjectors | None = None
        if config.cross_tokenizer is not None:
            self._check_cross_tokenizer()
        elif teacher_processing_class is not None:
            raise ValueError(
                "teacher_processing_class is read only for cross-tokenizer distillation: add "
                "cross_tokenizer={'loss': 'uld'} (or 'span_kl', 'dskd') to the DistillationConfig, or leave it out"
            )
        if self.causal_lm:
            if config.cross_tokenizer is None:
                truncate = config.token_loss is not None and config.token_loss.vocab_truncation
                try:
                    check_vocabularies(_unwrap_peft(self.model), teacher_model, truncate)
                except ValueError as err:
                    raise ValueError(
                        f"{err}. With different tokenizers, distil across them: DistillationConfig("
                        "cross_tokenizer={'loss': 'uld'}) or {'loss': 'span_kl'} or {'loss': 'dskd'}, with "
                        "teacher_processing_class=teacher_tokenizer"
                    ) from None
            for spec in config.methods:
                cls = method_class(spec.name)
                if cls.family == "logit" or "logits" in cls.pair_kinds:
                    raise ValueError(
                        f"method {spec.name!r} scores one distribution per example, but a causal LM predicts one per "
                        "token (pads included); use the token-level loss, e.g. token_loss={'divergence': 'forward_kl'}"
                        " (or 'reverse_kl', 'jsd', 'tvd', 'skew_kl', 'skew_reverse_kl')"
                    )
                if cls.needs_target:
                    raise ValueError(
                        f"method {spec.name!r} needs one label per example, which a causal LM does not have; use "
                        "label_loss_weight for the language-modelling loss and token_loss for the teacher's tokens"
                    )
        elif config.token_loss is not None:
            raise ValueError("token_loss is for causal LMs; for this model use logit methods such as 'kd'")
        elif config.policy is not None:
            raise ValueError("policy (generated completions) is for causal LMs; this model is not one")
        self.policy = self._build_policy(config.policy)
        self.distiller = self._build_distiller(config.methods, example_input) if config.methods else None
        if self._distributed():
            # Adapters, method layers (and CRD's random memory banks) and projectors come from each process's own
            # random stream, and DDP copies only the modules it wraps: start every process from process 0's.
            parts = [] if self.distiller is None else [self.distiller.adapters, self.distiller.methods]
            _broadcast_from_first_process(parts + [m for m in [self.dskd_projectors] if m is not None])
        # A causal LM trained by the token and label losses alone asks both models for the scored positions' logits
        # only (``logits_to_keep`` as a boolean [batch, tokens] mask, Transformers >= 5).
        self.scored_logits_only = (
            self.causal_lm
            and self.distiller is None
            and slice_logits_to_keep is not None
            and all(
                "logits_to_keep" in inspect.signature(_unwrap_peft(m).forward).parameters
                for m in (self.model, teacher_model)
            )
        )
        # A token loss alone, in one process, on two plain LM heads: both models stop at their last hidden state and
        # the loss makes each chunk's logits itself (hidden_token_distillation_loss), so no [tokens × V] tensor is
        # held, and the student head's gradient is one contiguous buffer that a tied embedding's adds into in place.
        self.fused_head = (
            self.scored_logits_only
            and config.token_loss is not None
            and not config.label_loss_weight
            and config.cross_tokenizer is None
            and self.args.parallel_mode != ParallelMode.DISTRIBUTED
            and not self.is_deepspeed_enabled
            and not self.is_fsdp_enabled
            and _plain_head(self.model)
            and _plain_head(teacher_model)
        )
        if self.is_fsdp_enabled:
            # Last, once every check above has read the whole teacher: each process keeps 1/P of its weights and
            # gathers one layer at a time in the forward pass (DDP keeps a whole copy per process, unwrapped).
            self.teacher_model = _shard_for_inference(self.teacher_model, self.accelerator)
        self._term_sums: dict[str, Tensor] = {}
        self._term_count = 0
        self.add_callback(_DistillerCallback(self))

    # ---- setup --------------------------------------------------------------------------------------------

    def _check_cross_tokenizer(self) -> None:
        """Both tokenizers are given and fit their models; span_kl's shared vocabulary is built once, here."""
        if not self.causal_lm:
            raise ValueError("cross_tokenizer is for causal LMs; this model is not one")
        for name, tokenizer, model in (
            ("processing_class", self.processing_class, self.model),
            ("teacher_processing_class", self.teacher_processing_class, self.teacher_model),
        ):
            if tokenizer is None or not hasattr(tokenizer, "decode"):
                raise ValueError(
                    f"cross_tokenizer aligns the two models' tokens by text and needs both tokenizers: pass "
                    f"{name}=<that model's tokenizer> to DistillationTrainer"
                )
            width = vocab_size(_unwrap_peft(model))
            if len(tokenizer) > width:
                raise ValueError(
                    f"{name} has {len(tokenizer)} tokens but its model predicts {width}: is it that model's "
                    "tokenizer? (student: processing_class, teacher: teacher_processing_class)"
                )
        if self.distillation.cross_tokenizer.loss == "span_kl":
            self.shared_vocab = vocab_map(self.processing_class, self.teacher_processing_class)
        if self.distillation.cross_tokenizer.loss == "dskd":
            self._build_dskd_projectors()

    def _build_dskd_projectors(self) -> None:
        """DSKD's projectors, sized by the two LM heads and kept by the trainer (see distiller_parameters)."""
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise NotImplementedError(
                "cross_tokenizer loss 'dskd' supports DDP but not FSDP or DeepSpeed: it reads the unsharded LM heads; "
                "use 'uld' or 'span_kl' there"
            )
        heads = [_unwrap_peft(m).get_output_embeddings() for m in (self.model, self.teacher_model)]
        if any(not isinstance(getattr(head, "weight", None), Tensor) for head in heads):
            raise ValueError(
                "cross_tokenizer loss 'dskd' reads both models' LM heads (get_output_embeddings().weight), but one "
                "model has none; use 'uld' or 'span_kl'"
            )
        sizes = [head.weight.shape[1] for head in heads]
        self.dskd_projectors = DualSpaceProjectors(*sizes).to(self._student_device())

    def _prepare_teacher(self) -> None:
        teacher = self.teacher_model
        teacher.requires_grad_(False)
        teacher.eval()
        dtype = getattr(torch, self.distillation.teacher_dtype) if self.distillation.teacher_dtype else None
        # under FSDP the sharding places the teacher (whose weights may be on the meta device outside process 0)
        teacher.to(device=None if self.is_fsdp_enabled else self._student_device(), dtype=dtype)
        if getattr(getattr(teacher, "config", None), "use_cache", False):
            teacher.config.use_cache = False  # a frozen teacher scores whole sequences: a KV cache is only memory

    def _build_policy(self, config: PolicyConfig | None) -> MixedPolicy | None:
        if config is None or not config.generates:
            return None
        generation = getattr(_unwrap_peft(self.model), "generation_config", None)
        tokenizer = self.processing_class
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = pad if pad is not None else getattr(generation, "pad_token_id", None)
        eos = getattr(generation, "eos_token_id", None)
        eos = eos if eos is not None else getattr(tokenizer, "eos_token_id", None)
        if pad is None:
            pad = eos[0] if isinstance(eos, list) else eos
        if pad is None:
            raise ValueError(
                "policy generates completions but neither the tokenizer (processing_class=) nor the student's "
                "generation_config names a pad or EOS token: pass processing_class=tokenizer"
            )
        return MixedPolicy(config, pad_token_id=pad, eos_token_id=eos, seed=self.args.seed)

    def _student_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _build_distiller(self, methods: list[MethodSpec], example_input: Mapping[str, Tensor] | None) -> Distiller:
        if example_input is None and any(spec.pairs for spec in methods):
            example_input = self._example_batch()
        if example_input is not None:
            example_input = {k: v for k, v in self._prepare_inputs(dict(example_input)).items() if k != "labels"}
        return Distiller(self.model, self.teacher_model, methods, example_input=example_input)

    def _example_batch(self) -> dict[str, Tensor]:
        """The first two training examples, collated as the training loader does (no sampler: no RNG is used)."""
        if self.train_dataset is None:
            raise ValueError(
                "methods with layer pairs size their adapters from a batch: pass train_dataset or example_input"
            )
        loader = self._get_dataloader(self.train_dataset, description="Training", batch_size=2)
        return next(iter(loader))

    def distiller_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the adapters, methods and DSKD's projectors (not the student's, not the
        teacher's)."""
        modules = [] if self.distiller is None else [self.distiller.adapters, self.distiller.methods]
        if self.dskd_projectors is not None:
            modules.append(self.dskd_projectors)
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    def _distributed(self) -> bool:
        return self.args.parallel_mode == ParallelMode.DISTRIBUTED and self.accelerator.num_processes > 1

    def _parameters_outside_ddp(self) -> list[nn.Parameter]:
        """The trainable parameters whose gradients DDP does not average: the adapters', methods' and
        projectors', and with methods the student's too (the distiller calls the unwrapped student, so the DDP
        wrapper's forward, which arms its gradient hooks, never runs)."""
        student = [p for p in self.model.parameters() if p.requires_grad] if self.distiller is not None else []
        return student + self.distiller_parameters()

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if INDEX_COLUMN not in self._signature_columns:
            self._signature_columns.append(INDEX_COLUMN)  # the models never see it: see _forward

    # ---- optimizer ------------------------------------------------------------------------------------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        given = self.optimizer is not None
        extra = self.distiller_parameters()
        if not given and extra:
            # One module over student, adapters and methods, so that the Trainer's usual optimizer construction
            # (weight-decay groups, optimizer class from the arguments) covers all of them.
            parts = {"student": self.model if model is None else model}
            if self.distiller is not None:
                parts |= {"adapters": self.distiller.adapters, "methods": self.distiller.methods}
            if self.dskd_projectors is not None:
                parts["projectors"] = self.dskd_projectors
            model = nn.ModuleDict(parts)
        optimizer = super().create_optimizer(model)
        if given and extra:
            optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if any(id(p) not in optimized for p in extra):
                raise ValueError(
                    "the optimizer passed to DistillationTrainer misses the adapter/method/projector parameters; pass "
                    "optimizer_cls_and_kwargs= instead, or build it over model.parameters() + "
                    "trainer.distiller_parameters() and set trainer.optimizer before train()"
                )
        return optimizer

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        # After the last micro-batch of an optimizer step (the Trainer sets sync_gradients for it), before clipping
        # and the step: once per step, like DDP's own reduction, which the accumulation steps skip.
        if self._distributed() and self.accelerator.sync_gradients:
            extra = self._parameters_outside_ddp()
            if extra:
                _average_gradients(extra)
        return loss

    def _clip_grad_norm(self, model: nn.Module) -> Tensor:
        extra = self.distiller_parameters()
        if not extra:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_([*model.parameters(), *extra], self.args.max_grad_norm)

    # ---- loss ----------------------------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The next accumulated batch, its completions replaced per the mixed policy *before* the labelled tokens
        are counted, so that the loss is normalised by the completion tokens actually trained on."""
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.policy is not None:  # only the training loop fetches batches here (the model may still be in eval)
            for micro, batch in enumerate(batch_samples):
                batch = self._prepare_inputs(batch)
                batch_samples[micro], _ = self.policy(
                    batch,
                    self.state.global_step,
                    micro,
                    self.state.max_steps,
                    student=self.model,
                    teacher=self.teacher_model,
                    process=self.args.process_index,
                )
            num_items = self._get_num_items_in_batch(batch_samples, device)
        if self.causal_lm and batch_samples and num_items is not None and int(num_items) == 0:
            raise ValueError(
                f"the batch at step {self.state.global_step} has no labelled completion token (every label is "
                "-100): check that prompts are not longer than max_length and that completions are labelled"
            )
        if self.distillation.cross_tokenizer is not None and batch_samples:
            self._align_batch_samples(batch_samples, device)
        return batch_samples, num_items

    def _align_batch_samples(self, batch_samples: list, device: torch.device) -> None:
        """Give every micro-batch the teacher's ids and the aligned pairs (after on-policy generation), and the
        number of pairs of the whole accumulated batch (of all processes when tokens are averaged across them),
        which normalises the cross-tokenizer loss as ``num_items_in_batch`` does the token loss."""
        for micro, batch in enumerate(batch_samples):
            if "labels" not in batch:
                raise ValueError(self._missing_labels_message())
            batch_samples[micro] = {**batch, **self._align(batch)}
        total = torch.tensor(sum(len(b["aligned_positions"]) for b in batch_samples), device=device)
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            total = self.accelerator.gather(total).sum()
        if int(total) == 0:
            warnings.warn(
                f"the batch at step {self.state.global_step} has no completion text that both tokenizers can "
                "align (e.g. completions of EOS only): it adds no cross-tokenizer loss",
                stacklevel=2,
            )
        for batch in batch_samples:
            batch[ALIGNED_ROWS_KEY] = total

    def _align(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        max_length = self.distillation.cross_tokenizer.teacher_max_length
        return align_batch(batch, self.processing_class, self.teacher_processing_class, max_length)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Tensor | int | None:
        if self.causal_lm:
            # Count the tokens the shifted losses score (labels[..., 1:]). Transformers infers the shift from the
            # model's loss_type, which some causal LMs (GPT-2) leave unset, and would count one token per row too many.
            batch_samples = [
                {**b, "shift_labels": b["labels"][..., 1:]} if "labels" in b and "shift_labels" not in b else b
                for b in batch_samples
            ]
        return super()._get_num_items_in_batch(batch_samples, device)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        config = self.distillation
        if config.cross_tokenizer is not None:
            return self._cross_tokenizer_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.get("labels")
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}  # the teacher need not compute a loss
        if (config.label_loss_weight or config.token_loss is not None) and labels is None:
            raise ValueError(self._missing_labels_message())
        if self.fused_head and not return_outputs:
            return self._hidden_token_loss(model, model_inputs, labels, num_items_in_batch)
        shift = True
        if self.scored_logits_only and labels is not None and not return_outputs:
            # Only the scored positions (those followed by a labelled token) go through either LM head: no
            # [batch × tokens × vocab] logits for prompts and padding. Logits come back as [scored, vocab], and
            # the labels are shifted here, once.
            scored = torch.zeros_like(labels, dtype=torch.bool)
            scored[:, :-1] = labels[:, 1:] != -100
            model_inputs["logits_to_keep"] = scored
            labels, shift = labels[:, 1:][scored[:, :-1]][None], False
        student_logits, teacher_logits, batch_terms, stats = self._forward(model, model_inputs, labels)
        if not shift:
            student_logits, teacher_logits = student_logits[None], teacher_logits[None]
        token_terms: dict[str, Tensor] = {}
        if config.label_loss_weight:
            loss = self._label_loss(student_logits, labels, num_items_in_batch, shift)
            (token_terms if self.causal_lm else batch_terms)["label"] = config.label_loss_weight * loss
        if config.token_loss is not None:
            token_terms["token"] = config.token_loss.weight * self._token_loss(
                student_logits, teacher_logits, labels, num_items_in_batch, shift
            )
        # Every term as its micro-batch's share of the mean over the accumulated batch, like a per-batch term: the
        # loss divides all of them by the micro-batch count and the log averages them over the micro-batches.
        factor = self._token_factor(model, num_items_in_batch)
        terms = {**batch_terms, **{name: value * factor for name, value in token_terms.items()}}
        loss = self._micro_batch_loss(model, terms, stats)
        return (loss, {"logits": student_logits}) if return_outputs else loss

    def _cross_tokenizer_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool,
        num_items_in_batch: Tensor | int | None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The label loss on the student's own tokens plus the cross-tokenizer loss on the aligned pairs: summed
        over the pairs and divided by the pairs of the accumulated batch (counted in get_batch_samples; a batch
        that did not pass there, e.g. in evaluation, is aligned here and divided by its own pairs)."""
        config, c = self.distillation, self.distillation.cross_tokenizer
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError(self._missing_labels_message())
        inputs.pop(INDEX_COLUMN, None)
        total = inputs.pop(ALIGNED_ROWS_KEY, None)
        aligned = {key: inputs.pop(key) for key in ALIGNMENT_KEYS if key in inputs}
        if len(aligned) < len(ALIGNMENT_KEYS):
            aligned = self._align({**inputs, "labels": labels})
            total = None
        pairs = aligned["aligned_positions"].to(labels.device)
        rows, student_pos, teacher_pos = pairs.unbind(1)
        # DSKD also reads the last hidden states at the pairs; the other losses need no hidden states at all
        dskd = c.loss == "dskd"
        hidden: dict[str, Any] = {"output_hidden_states": True} if dskd else {}
        next_tokens = labels[rows, student_pos + 1]  # the student's label at each pair (DSKD's cross-entropy)

        shift = True
        if self.scored_logits_only and not return_outputs:
            # Both LM heads only at the positions scored: the student's labelled next tokens (which include every
            # aligned student position) and the teacher's aligned positions; logits come back as [kept, vocab].
            scored = torch.zeros_like(labels, dtype=torch.bool)
            scored[:, :-1] = labels[:, 1:] != -100
            student_out = model(**inputs, logits_to_keep=scored, **hidden)
            student_rows = _rank(scored)[rows, student_pos]
            labels, shift = labels[:, 1:][scored[:, :-1]][None], False
        else:
            student_out = model(**inputs, **hidden)
            student_rows = rows * labels.shape[1] + student_pos
        student_logits = model_logits(student_out)
        student_hidden = student_out.hidden_states[-1][rows, student_pos] if dskd else None
        del student_out
        teacher_ids = aligned["teacher_input_ids"].to(labels.device)
        teacher_inputs = {
            "input_ids": teacher_ids,
            "attention_mask": aligned["teacher_attention_mask"].to(labels.device),
        }
        with torch.no_grad():
            if self.scored_logits_only:
                kept = torch.zeros_like(teacher_ids, dtype=torch.bool)
                kept[rows, teacher_pos] = True
                teacher_out = self.teacher_model(**teacher_inputs, logits_to_keep=kept, **hidden)
                teacher_rows = _rank(kept)[rows, teacher_pos]
            else:
                teacher_out = self.teacher_model(**teacher_inputs, **hidden)
                teacher_rows = rows * teacher_ids.shape[1] + teacher_pos
            teacher_logits = model_logits(teacher_out)
            teacher_hidden = teacher_out.hidden_states[-1][rows, teacher_pos] if dskd else None
            del teacher_out  # the teacher's other layers' hidden states
        options: dict[str, Any] = dict(
            student_rows=student_rows, teacher_rows=teacher_rows, reduction="sum", chunk_size=c.chunk_size
        )
        if c.loss == "uld":
            summed = uld_loss(student_logits, teacher_logits, c.temperature, top_k=c.top_k, **options)
        elif dskd:
            heads = [_unwrap_peft(m).get_output_embeddings().weight for m in (self.model, self.teacher_model)]
            summed = dskd_loss(
                student_logits,
                teacher_logits,
                student_hidden,
                teacher_hidden,
                *heads,
                self.dskd_projectors.to_teacher,
                self.dskd_projectors.to_student,
                next_tokens,
                c.temperature,
                correct_only=c.correct_only,
                **options,
            )
        else:
            summed = span_kl_loss(
                student_logits,
                teacher_logits,
                self.shared_vocab.student_ids,
                self.shared_vocab.teacher_ids,
                c.temperature,
                matched_weight=c.matched_weight,
                unmatched_weight=c.unmatched_weight,
                **options,
            )
        count = total if total is not None else len(pairs)
        terms = {c.loss: c.weight * summed / max(int(count), 1) * self._token_factor(model, total)}
        if config.label_loss_weight:
            if not shift:
                student_logits = student_logits[None]
            label = self._label_loss(student_logits, labels, num_items_in_batch, shift)
            terms["label"] = config.label_loss_weight * label * self._token_factor(model, num_items_in_batch)
        loss = self._micro_batch_loss(model, terms)
        return (loss, {"logits": student_logits}) if return_outputs else loss

    def _hidden_token_loss(
        self, model: nn.Module, inputs: dict[str, Any], labels: Tensor, num_items_in_batch: Tensor | int | None
    ) -> Tensor:
        """The token loss from both models' last hidden states and LM heads (see ``fused_head``): the backbones run
        without their heads and without a KV cache, the teacher's under no_grad."""
        inputs = {k: v for k, v in inputs.items() if k != INDEX_COLUMN} | {"use_cache": False}
        student, teacher = _unwrap_peft(model), _unwrap_peft(self.teacher_model)
        hidden = student.base_model(**inputs).last_hidden_state
        with torch.no_grad():
            teacher_hidden = teacher.base_model(**inputs).last_hidden_state
        s_head, t_head = student.get_output_embeddings(), teacher.get_output_embeddings()
        c = self.distillation.token_loss
        token = c.weight * hidden_token_distillation_loss(
            hidden,
            s_head.weight,
            teacher_hidden,
            t_head.weight,
            labels,
            student_bias=s_head.bias,
            teacher_bias=t_head.bias,
            num_items=num_items_in_batch,
            **c.loss_arguments(),
        )
        return self._micro_batch_loss(model, {"token": token * self._token_factor(model, num_items_in_batch)})

    def _missing_labels_message(self) -> str:
        if not self.causal_lm:
            return "label_loss_weight > 0 needs each example's target in the batch, under 'labels'"
        return (
            "token_loss and label_loss_weight score the tokens whose label is not -100, but the batch has no "
            "'labels': collate with DataCollatorForLanguageModeling(tokenizer, mlm=False), or give each example "
            "labels = input_ids with the padding positions set to -100"
        )

    def _forward(
        self, model: nn.Module, inputs: dict[str, Any], labels: Tensor | None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """Student and teacher logits, the methods' weighted loss terms and the Fisher diagnostics. A batch column
        ``index`` (the examples' dataset indices, for memory banks such as CRD's) goes to the methods, not the
        models."""
        index = inputs.pop(INDEX_COLUMN, None)
        if self.distiller is None:
            with torch.no_grad():
                teacher_logits = model_logits(self.teacher_model(**inputs))
            return model_logits(model(**inputs)), teacher_logits, {}, {}
        self.distiller.train(model.training)  # adapters and methods follow the student; the teacher stays in eval
        out = self.distiller(inputs, None if self.causal_lm else labels, index=index)
        return out.logits, out.teacher_logits, dict(out.losses), out.stats

    def _label_loss(
        self, logits: Tensor, labels: Tensor, num_items_in_batch: Tensor | int | None, shift: bool = True
    ) -> Tensor:
        """The student's own task loss, by Transformers' loss functions (so regression / multi-label work too)."""
        if self.causal_lm:
            shifted = {} if shift else {"shift_labels": labels}
            return ForCausalLMLoss(logits, labels, logits.shape[-1], num_items_in_batch=num_items_in_batch, **shifted)
        return ForSequenceClassificationLoss(labels, logits, _unwrap_peft(self.model).config)

    def _token_loss(
        self,
        student: Tensor,
        teacher: Tensor,
        labels: Tensor,
        num_items_in_batch: Tensor | int | None,
        shift: bool = True,
    ) -> Tensor:
        return token_distillation_loss(
            student,
            teacher,
            labels,
            shift=shift,
            num_items=num_items_in_batch,
            **self.distillation.token_loss.loss_arguments(),
        )

    def _token_factor(self, model: nn.Module, num_items_in_batch: Tensor | int | None) -> float:
        """What turns a token term into its micro-batch's share of the per-token mean times the micro-batch count.

        A token term is Σ_tokens ℓ / N with N the labelled tokens of the whole accumulated batch (all micro-batches,
        and all processes under ``average_tokens_across_devices``), so the terms of the micro-batches add up to the
        mean: multiplied by the micro-batch count (and the process count, as DDP averages gradients), they are
        averaged like per-batch terms. Without N each term is its own micro-batch's mean already.
        """
        if num_items_in_batch is None:
            return 1.0
        factor = getattr(self, "current_gradient_accumulation_steps", 1) if model.training else 1
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            factor *= self.accelerator.num_processes
        return float(factor)

    # ---- logging -------------------------------------------------------------------------------------------

    def _micro_batch_loss(
        self, model: nn.Module, terms: dict[str, Tensor], stats: dict[str, Tensor] | None = None
    ) -> Tensor:
        """The micro-batch's loss, Σ terms over the accumulation steps (the Trainer adds the micro-batches' losses up);
        in training, the terms and diagnostics are also summed for the next log."""
        steps = getattr(self, "current_gradient_accumulation_steps", 1) if model.training else 1
        if model.training:
            self._accumulate_terms({**terms, **(stats or {})})
        return sum(terms.values()) / steps

    def _accumulate_terms(self, terms: dict[str, Tensor]) -> None:
        for name, value in terms.items():
            value = value.detach().float()
            self._term_sums[name] = self._term_sums[name] + value if name in self._term_sums else value
        self._term_count += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._term_count:  # a training log: add the mean of every term since the last one
            names = list(self._term_sums)
            means = torch.stack([self._term_sums[name] for name in names]) / self._term_count
            if self._distributed():  # the whole global batch's means, as the Trainer logs the loss
                means = self.accelerator.reduce(means, reduction="mean")
            logs |= {f"distill/{name}": value for name, value in zip(names, means.tolist())}
            self._term_sums, self._term_count = {}, 0
            if self.policy is not None:  # batches per completion source so far, and DistiLLM's threshold
                logs |= {f"policy/{source}": count for source, count in self.policy.counts.items()}
                if self.policy.config.adaptive:
                    logs["policy/threshold"] = self.policy.threshold
        super().log(logs, start_time)

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def _distiller_state(self) -> dict[str, Tensor]:
        # The student is saved by the Trainer itself; the (frozen) teacher only when it changes during training.
        return {k: v for k, v in self.distiller.training_state_dict().items() if not k.startswith("student.")}

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.distiller is not None:
            torch.save(self._distiller_state(), os.path.join(folder, DISTILLER_STATE_NAME))
        if self.policy is not None:
            torch.save(self.policy.state_dict(), os.path.join(folder, POLICY_STATE_NAME))
        if self.dskd_projectors is not None:
            torch.save(self.dskd_projectors.state_dict(), os.path.join(folder, PROJECTORS_STATE_NAME))

    def _load_projectors(self, folder: str) -> None:
        if self.dskd_projectors is None:
            return
        path = os.path.join(folder, PROJECTORS_STATE_NAME)
        if not os.path.isfile(path):
            warnings.warn(f"{folder} has no {PROJECTORS_STATE_NAME}: DSKD's projectors start afresh", stacklevel=2)
            return
        state = torch.load(path, map_location=self._student_device(), weights_only=True)
        self.dskd_projectors.load_state_dict(state)

    def _load_distiller_state(self, folder: str) -> None:
        path = os.path.join(folder, DISTILLER_STATE_NAME)
        if self.distiller is None:
            return
        if not os.path.isfile(path):
            if self._distiller_state():
                warnings.warn(
                    f"{folder} has no {DISTILLER_STATE_NAME}: adapters and methods start afresh", stacklevel=2
                )
            return
        state = torch.load(path, map_location=self._student_device(), weights_only=True)
        missing, unexpected = self.distiller.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(("student.", "teacher."))]
        if missing or unexpected:
            raise RuntimeError(
                f"{path} does not match this distiller (missing {missing}, unexpected {unexpected}): was it saved "
                "with the same methods and pairs?"
            )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_distiller_state(resume_from_checkpoint)
        self._load_projectors(resume_from_checkpoint)
        path = os.path.join(resume_from_checkpoint, POLICY_STATE_NAME)
        if self.policy is not None and os.path.isfile(path):
            self.policy.load_state_dict(torch.load(path, weights_only=True))

    def _load_best_model(self) -> None:
        super()._load_best_model()
        self._load_distiller_state(self.state.best_model_checkpoint)
        self._load_projectors(self.state.best_model_checkpoint)
