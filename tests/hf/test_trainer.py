"""DistillationTrainer on tiny BERT / GPT-2 models built locally (nothing is downloaded)."""

import math
import os

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

import torch  # noqa: E402
from test_layers import VOCAB, tiny_bert, tiny_gpt2  # noqa: E402
from transformers import TrainerCallback, TrainingArguments  # noqa: E402

from fisherkd.hf import DistillationConfig, DistillationTrainer, attention_pairs, hidden_pairs  # noqa: E402
from fisherkd.hf.trainer import DISTILLER_STATE_NAME  # noqa: E402

LENGTH = 8


def text_examples(n: int, seed: int = 0, causal: bool = False, pad: bool = True) -> list[dict[str, torch.Tensor]]:
    """Random token sequences with varied padding; labels are classes, or next-token labels with -100 on padding."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (LENGTH,), generator=g)
        length = LENGTH - (i % 4 if pad else 0)
        mask = (torch.arange(LENGTH) < length).long()
        example = {"input_ids": ids * mask, "attention_mask": mask}
        example["labels"] = torch.where(mask.bool(), ids, -100) if causal else torch.tensor(int(ids[0]) % 3)
        examples.append(example)
    return examples


def arguments(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return TrainingArguments(**{**settings, **overrides})


def bert_trainer(tmp_path, student=None, **overrides) -> DistillationTrainer:
    torch.manual_seed(0)
    teacher, student = tiny_bert(layers=4), student or tiny_bert(layers=2, hidden=8)
    pairs = hidden_pairs(student, teacher, embeddings=True) + attention_pairs(student, teacher)
    config = DistillationConfig(methods=[{"name": "tinybert", "pairs": pairs}, "kd", "ce"])
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        distillation=config,
        args=arguments(tmp_path, **overrides),
        train_dataset=text_examples(16),
    )


def losses(trainer: DistillationTrainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def assert_finite_and_decreasing(values: list[float]) -> None:
    assert all(math.isfinite(v) for v in values), values
    assert sum(values[-3:]) < sum(values[:3]), values


def test_sequence_classification_trains_with_a_frozen_teacher(tmp_path):
    trainer = bert_trainer(tmp_path)
    before = {k: v.clone() for k, v in trainer.teacher_model.state_dict().items()}
    optimized = {id(p) for group in trainer.create_optimizer().param_groups for p in group["params"]}
    adapters = trainer.distiller_parameters()
    assert adapters and all(id(p) in optimized for p in adapters)
    assert not any(id(p) in optimized for p in trainer.teacher_model.parameters())
    start = [p.detach().clone() for p in adapters]

    trainer.train()

    assert_finite_and_decreasing(losses(trainer))
    logged = trainer.state.log_history[0]
    assert {"distill/tinybert_hidden", "distill/tinybert_attention", "distill/kd", "distill/ce"} <= set(logged)
    after = trainer.teacher_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    assert not trainer.teacher_model.training
    assert all(not p.requires_grad for p in trainer.teacher_model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(start, adapters))  # the adapters were trained
    assert all(p.grad is None for p in adapters)  # and their gradients cleared after every step
    assert math.isfinite(trainer.evaluate(text_examples(8, seed=1))["eval_loss"])


def causal_config(**token) -> DistillationConfig:
    return DistillationConfig(
        methods=[{"name": "minilm", "pairs": [("transformer.h.0.attn:1", "transformer.h.1.attn:1")]}],
        token_loss={"divergence": "forward_kl", "temperature": 2.0, "chunk_size": 16, **token},
        label_loss_weight=0.5,
    )


def test_causal_lm_trains_with_token_and_attention_losses(tmp_path):
    torch.manual_seed(0)
    trainer = DistillationTrainer(
        model=tiny_gpt2(layers=1, hidden=8),
        teacher_model=tiny_gpt2(layers=2),
        distillation=causal_config(),
        args=arguments(tmp_path),
        train_dataset=text_examples(16, causal=True),
    )
    trainer.train()
    assert_finite_and_decreasing(losses(trainer))
    assert {"distill/token", "distill/label", "distill/minilm_attention"} <= set(trainer.state.log_history[0])
    assert not trainer.teacher_model.training


def test_causal_lm_token_loss_only_and_bf16_teacher(tmp_path):
    torch.manual_seed(0)
    config = DistillationConfig(token_loss={"divergence": "reverse_kl"}, teacher_dtype="bfloat16")
    trainer = DistillationTrainer(
        model=tiny_gpt2(layers=1, hidden=8),
        teacher_model=tiny_gpt2(layers=2),
        distillation=config,
        args=arguments(tmp_path, max_steps=3),
        train_dataset=text_examples(12, causal=True),
    )
    assert trainer.distiller is None and trainer.teacher_model.dtype == torch.bfloat16
    trainer.train()
    assert all(math.isfinite(v) for v in losses(trainer))


class RecordGradients(TrainerCallback):
    def __init__(self, trainer: DistillationTrainer) -> None:
        self.trainer, self.grads = trainer, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        params = [*self.trainer.model.parameters(), *self.trainer.distiller_parameters()]
        self.grads.append([p.grad.clone() for p in params if p.grad is not None])


def one_step_causal_trainer(tmp_path, batch_size: int, accumulation: int, dataset: list) -> DistillationTrainer:
    """A tiny GPT-2 pair for one optimizer step of ``batch_size`` × ``accumulation`` sequences."""
    torch.manual_seed(0)
    return DistillationTrainer(
        model=tiny_gpt2(layers=1, hidden=8),
        teacher_model=tiny_gpt2(layers=2),
        distillation=causal_config(),
        args=arguments(
            tmp_path, max_steps=1, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation
        ),
        train_dataset=dataset,
    )


def first_step(tmp_path, batch_size: int, accumulation: int) -> tuple[float, list[torch.Tensor]]:
    # no padding of the inputs (so the per-batch attention term splits evenly), but labels with -100 on
    # different numbers of tokens per example: the token terms must be normalised by the global count
    dataset = [
        {**e, "labels": torch.where(torch.arange(LENGTH) < LENGTH - 2 * i, e["labels"], -100)}
        for i, e in enumerate(text_examples(4, causal=True, pad=False))
    ]
    trainer = one_step_causal_trainer(tmp_path, batch_size, accumulation, dataset)
    recorder = RecordGradients(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    return losses(trainer)[0], recorder.grads[0]


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    loss_full, grads_full = first_step(tmp_path / "full", batch_size=4, accumulation=1)
    loss_accumulated, grads_accumulated = first_step(tmp_path / "accumulated", batch_size=1, accumulation=4)
    assert math.isclose(loss_full, loss_accumulated, rel_tol=1e-5)
    assert len(grads_full) == len(grads_accumulated)
    for a, b in zip(grads_full, grads_accumulated):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def adapter_state(trainer: DistillationTrainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.distiller.adapters.state_dict().items()}


def test_resume_from_checkpoint_restores_adapters_and_continues_exactly(tmp_path):
    straight = bert_trainer(tmp_path / "a", max_steps=6, save_strategy="steps", save_steps=3)
    straight.train()
    checkpoint = tmp_path / "a" / "checkpoint-3"
    assert (checkpoint / DISTILLER_STATE_NAME).is_file()
    saved = torch.load(checkpoint / DISTILLER_STATE_NAME)
    assert saved and not any(k.startswith(("student.", "teacher.")) for k in saved)

    resumed = bert_trainer(tmp_path / "b", max_steps=6)
    fresh = adapter_state(resumed)
    resumed._load_from_checkpoint(str(checkpoint))
    restored = adapter_state(resumed)
    assert any(not torch.equal(fresh[k], restored[k]) for k in fresh)
    assert all(torch.equal(restored[k], saved[f"adapters.{k}"]) for k in restored)

    resumed.train(resume_from_checkpoint=str(checkpoint))
    final, expected = adapter_state(resumed), adapter_state(straight)
    for k in expected:
        torch.testing.assert_close(final[k], expected[k], rtol=1e-5, atol=1e-6)
    for a, b in zip(resumed.model.parameters(), straight.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fisher_statistics_are_checkpointed(tmp_path):
    torch.manual_seed(0)
    teacher, student = tiny_bert(layers=4), tiny_bert(layers=2, hidden=8)
    (pair,) = attention_pairs(student, teacher, "last")
    fisher = {"axis": "head", "estimator": "sampled", "tap": pair[1].replace(":1", ":0"), "num_heads": 2, "every": 1}
    config = DistillationConfig(methods=[{"name": "tinybert", "pairs": [pair], "fisher": fisher}, "ce"])

    def trainer(out, **overrides):
        return DistillationTrainer(
            model=student,
            teacher_model=teacher,
            distillation=config,
            args=arguments(out, max_steps=3, save_strategy="steps", save_steps=3, **overrides),
            train_dataset=text_examples(16),
        )

    first = trainer(tmp_path / "a")
    first.train()
    assert "distill/fisher.tinybert.head.entropy" in first.state.log_history[0]
    saved = first.distiller.fisher.state_dict()
    assert saved["tinybert.statistic.value"].numel() == 2  # one importance per teacher head

    second = trainer(tmp_path / "b")
    second._load_from_checkpoint(str(tmp_path / "a" / "checkpoint-3"))
    loaded = second.distiller.fisher.state_dict()
    assert torch.equal(loaded["tinybert.statistic.value"], saved["tinybert.statistic.value"])
    assert loaded["tinybert._extra_state"]["step"] == 3


def test_vocabulary_mismatch_is_a_clear_error(tmp_path):
    make = dict(distillation=DistillationConfig(token_loss={}), args=arguments(tmp_path))
    with pytest.raises(ValueError, match="student vocabulary size 40 differs from teacher vocabulary size 48"):
        DistillationTrainer(model=tiny_gpt2(), teacher_model=tiny_gpt2(vocab=48), **make)
    make["distillation"] = DistillationConfig(token_loss={"vocab_truncation": True})
    DistillationTrainer(model=tiny_gpt2(), teacher_model=tiny_gpt2(vocab=48), **make)


def test_configuration_errors(tmp_path):
    with pytest.raises(ValueError, match="nothing to train with"):
        DistillationConfig()
    with pytest.raises(KeyError, match="unknown method"):
        DistillationConfig(methods=["kdd"])
    args = arguments(tmp_path)
    with pytest.raises(ValueError, match="token_loss is for causal LMs"):
        config = DistillationConfig(token_loss={})
        DistillationTrainer(model=tiny_bert(layers=1), teacher_model=tiny_bert(), distillation=config, args=args)
    with pytest.raises(ValueError, match="'ce' needs one label per example"):
        config = DistillationConfig(methods=["ce"])
        DistillationTrainer(model=tiny_gpt2(), teacher_model=tiny_gpt2(), distillation=config, args=args)
    # without a config: token-level forward KL for a causal LM, logit KD otherwise
    assert DistillationTrainer(model=tiny_gpt2(), teacher_model=tiny_gpt2(), args=args).distillation.token_loss
    assert DistillationTrainer(model=tiny_bert(1), teacher_model=tiny_bert(), args=args).distiller.specs[0].name == "kd"


def test_report_to_tensorboard_gets_every_loss_term(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = bert_trainer(tmp_path, max_steps=2, report_to="tensorboard")
    trainer.train()
    runs = [root for root, _, files in os.walk(tmp_path) if any("tfevents" in f for f in files)]
    tags = EventAccumulator(runs[0]).Reload().Tags()["scalars"]
    assert {"train/loss", "train/distill/tinybert_hidden", "train/distill/kd"} <= set(tags)


def test_report_to_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    trainer = bert_trainer(tmp_path, max_steps=2, report_to="wandb")
    trainer.train()
    try:
        assert wandb.run is not None and wandb.run.offline
        assert {"train/loss", "train/distill/tinybert_hidden", "train/distill/kd"} <= set(wandb.run.summary.keys())
    finally:
        wandb.finish()


def test_lora_student(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = tiny_bert(layers=2)
    student = peft.get_peft_model(
        base, peft.LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"])
    )
    trainer = bert_trainer(tmp_path, student=student, max_steps=6)
    assert all(s.startswith("base_model.model.bert.") for s, _ in trainer.distillation.methods[0].pairs)
    lora = {n: p.detach().clone() for n, p in student.named_parameters() if "lora_B" in n}
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    trainer.train()
    assert all(math.isfinite(v) for v in losses(trainer))
    named = dict(student.named_parameters())
    assert any(not torch.equal(v, named[n]) for n, v in lora.items())
    assert all(torch.equal(v, named[n]) for n, v in frozen.items())


def first_log(tmp_path, batch_size: int, accumulation: int) -> dict[str, float]:
    trainer = one_step_causal_trainer(tmp_path, batch_size, accumulation, text_examples(4, causal=True, pad=False))
    trainer.train()
    return trainer.state.log_history[0]


def test_logged_token_terms_are_the_mean_over_the_accumulated_batch(tmp_path):
    # the same 4 sequences as one batch or as 2 accumulated micro-batches of 2: the same step, the same logs
    # (each term was logged at 1/accumulation of its value before)
    one = first_log(tmp_path / "one", batch_size=4, accumulation=1)
    two = first_log(tmp_path / "two", batch_size=2, accumulation=2)
    for name in ("loss", "distill/token", "distill/label", "distill/minilm_attention"):
        assert math.isclose(one[name], two[name], rel_tol=1e-5), (name, one[name], two[name])
    # the logged terms are the parts of the logged loss
    parts = one["distill/token"] + one["distill/label"] + one["distill/minilm_attention"]
    assert math.isclose(one["loss"], parts, rel_tol=1e-5)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            dict(token_loss={"divergence": "forward-kl"}),
            r"divergence 'forward-kl' is unknown; did you mean: forward_kl",
        ),
        (dict(token_loss={"temprature": 2.0}), r"token_loss has no field 'temprature'; did you mean: temperature"),
        (dict(token_loss={"temperature": 0.0}), r"token_loss temperature must be a number > 0, got 0.0"),
        (dict(token_loss={"chunk_size": 0}), r"token_loss: chunk_size must be a positive number of tokens"),
        (dict(token_loss={"divergence": "jsd", "beta": 1.0}), r"token_loss: jsd needs 0 < beta < 1"),
        (dict(token_loss={"beta": 1.5}), r"token_loss beta must be a number in \[0, 1\], got 1.5"),
        (dict(token_loss={"alpha": -0.1}), r"token_loss alpha must be a number in \[0, 1\], got -0.1"),
        (dict(token_loss={"weight": -1.0}), r"token_loss weight must be a number >= 0, got -1.0"),
        (dict(token_loss={"vocab_truncation": "yes"}), r"vocab_truncation must be True or False"),
        (dict(token_loss={}, label_loss_weight=-0.5), r"label_loss_weight must be a number >= 0, got -0.5"),
        (dict(methods=[{"name": "kd", "weight": -1}]), r"the weight of method 'kd' must be a number >= 0"),
        (dict(methods=[{"name": "kd", "temprature": 2}]), r"method 'kd' has no hyper-parameter 'temprature'"),
        (dict(token_loss={}, task="causal-lm"), r"task 'causal-lm' is unknown; did you mean: causal_lm"),
        (dict(token_loss={}, teacher_dtype="bf16"), r"teacher_dtype 'bf16' is unknown; did you mean: bfloat16"),
    ],
)
def test_every_config_field_is_checked_when_the_config_is_built(config, message):
    with pytest.raises((ValueError, TypeError), match=message) as error:
        DistillationConfig(**config)
    assert "\n" not in str(error.value)


def test_a_batch_without_labels_says_how_to_add_them(tmp_path):
    examples = [{k: v for k, v in e.items() if k != "labels"} for e in text_examples(8, causal=True)]
    trainer = DistillationTrainer(
        model=tiny_gpt2(layers=1, hidden=8),
        teacher_model=tiny_gpt2(layers=2),
        distillation=DistillationConfig(token_loss={}),
        args=arguments(tmp_path, max_steps=1),
        train_dataset=examples,
    )
    with pytest.raises(ValueError, match=r"DataCollatorForLanguageModeling\(tokenizer, mlm=False\).*-100"):
        trainer.train()


@pytest.mark.parametrize("name", ["kd", "jsd", "dkd", "dist"])
def test_logit_methods_are_refused_on_a_causal_lm(tmp_path, name):
    config = DistillationConfig(methods=[name])
    with pytest.raises(ValueError, match=r"one distribution per example.*token_loss=\{'divergence': 'forward_kl'\}"):
        DistillationTrainer(model=tiny_gpt2(), teacher_model=tiny_gpt2(), distillation=config, args=arguments(tmp_path))
