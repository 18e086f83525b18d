"""Mixed-policy distillation: on-policy (GKD), sequence-level KD and DistiLLM's adaptive replay, on tiny GPT-2s."""

import math

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch  # noqa: E402
from test_layers import VOCAB, tiny_gpt2  # noqa: E402
from test_trainer import RecordGradients, arguments, losses  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_utils import IntervalStrategy  # noqa: E402

from fisherkd.hf import DistillationConfig, DistillationTrainer, MixedPolicy, PolicyConfig  # noqa: E402
from fisherkd.hf.policy import generate_completions, prompts_of  # noqa: E402
from fisherkd.hf.trainer import POLICY_STATE_NAME  # noqa: E402

PAD, EOS = 0, 0  # the tiny GPT-2s use token 0 as BOS, EOS and pad
LENGTH = 8


def prompt_examples(n: int, prompt: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Sequences of LENGTH tokens (ids >= 1, so no EOS inside), right-padded by 0-2 tokens, whose first ``prompt``
    (+ i % 2) tokens are the prompt (label -100)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (LENGTH,), generator=g)
        length = LENGTH - i % 3
        mask = (torch.arange(LENGTH) < length).long()
        labelled = mask.bool() & (torch.arange(LENGTH) >= prompt + i % 2)
        examples.append({"input_ids": ids * mask, "attention_mask": mask, "labels": torch.where(labelled, ids, -100)})
    return examples


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


def greedy(model: torch.nn.Module, prompt: list[int], new: int) -> list[int]:
    """Greedy decoding by full forward passes, one token at a time (no KV cache, no padding): the reference."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == EOS:
                break
    return ids[len(prompt) :]


def test_prompts_are_the_tokens_before_the_first_label_left_padded():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 0], [9, 10, 11, 12, 13]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
        "labels": torch.tensor([[-100, 6, 7, 8, -100], [-100, -100, -100, 12, 13]]),
    }
    prompt, mask = prompts_of(batch, pad_token_id=PAD)
    assert prompt.tolist() == [[0, 0, 5], [9, 10, 11]]
    assert mask.tolist() == [[0, 0, 1], [1, 1, 1]]
    batch["labels"][1, 0] = 9
    with pytest.raises(ValueError, match="has no prompt"):
        prompts_of(batch, pad_token_id=PAD)


def test_generated_completions_are_the_models_own_greedy_tokens_with_the_prompt_masked():
    torch.manual_seed(1)
    model = tiny_gpt2(layers=1, hidden=8)
    model.config.eos_token_id = None  # greedy decoding runs to max_new_tokens (checked below with EOS too)
    batch = collate(prompt_examples(4))
    prompt, mask = prompts_of(batch, PAD)
    config = PolicyConfig(student_fraction=1.0, temperature=0.0, max_new_tokens=4)
    model.train()
    for eos in (None, EOS):
        out = generate_completions(model, prompt, mask, config, PAD, eos, seed=0)
        for i in range(4):
            p = prompt[i][mask[i].bool()].tolist()
            reference = greedy(model, p, 4) if eos is not None else _greedy_no_eos(model, p, 4)
            n = out["attention_mask"][i].sum()
            assert out["input_ids"][i, :n].tolist() == p + reference
            assert out["labels"][i, : len(p)].tolist() == [-100] * len(p)
            assert out["labels"][i, len(p) : n].tolist() == reference
            assert (out["labels"][i, n:] == -100).all() and (out["input_ids"][i, n:] == PAD).all()
    assert model.training  # sampled in eval mode, then left as it was


def _greedy_no_eos(model: torch.nn.Module, prompt: list[int], new: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_the_first_eos_is_labelled_and_what_follows_it_is_padding():
    class Scripted(torch.nn.Module):
        """Stands in for generate(): returns the prompt followed by a fixed script, to check the labelling."""

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, **kwargs):
            script = torch.tensor([[4, EOS, 5, 6], [7, 8, 9, EOS]])
            return torch.cat([input_ids, script], 1)

    prompt, mask = torch.tensor([[0, 3], [1, 2]]), torch.tensor([[0, 1], [1, 1]])
    out = generate_completions(Scripted(), prompt, mask, PolicyConfig(max_new_tokens=4), PAD, EOS, seed=0)
    assert out["input_ids"].tolist() == [[3, 4, EOS, 0, 0, 0], [1, 2, 7, 8, 9, EOS]]
    assert out["labels"].tolist() == [[-100, 4, EOS, -100, -100, -100], [-100, -100, 7, 8, 9, EOS]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]


def test_sources_follow_the_fractions_and_are_the_same_in_every_instance():
    config = PolicyConfig(student_fraction=0.3, teacher_fraction=0.2)
    a, b = MixedPolicy(config, PAD, EOS, seed=7), MixedPolicy(config, PAD, EOS, seed=7)
    draws = [a.choose(step, micro) for step in range(1000) for micro in range(2)]
    assert draws == [b.choose(step, micro) for step in range(1000) for micro in range(2)]
    n = len(draws)
    for source, share in (("student", 0.3), ("teacher", 0.2), ("data", 0.5)):
        assert abs(draws.count(source) / n - share) < 4 * math.sqrt(share * (1 - share) / n), source
    assert draws != [MixedPolicy(config, PAD, EOS, seed=8).choose(s, m) for s in range(1000) for m in range(2)]


def test_distillm_adaptive_schedule_and_replay():
    config = PolicyConfig(adaptive=True, init_threshold=0.0, replay_capacity=2)
    policy = MixedPolicy(config, PAD, EOS, seed=0)
    assert {policy.choose(s) for s in range(200)} == {"data"}  # threshold 0: the data only
    # the threshold rises by 0.1 only when the validation loss rises by >= loss_eps over the last recorded one
    for loss, threshold in ((2.0, 0.0), (2.05, 0.0), (2.1, 0.1), (2.15, 0.1), (1.0, 0.1), (2.2, 0.2)):
        policy.observe_validation_loss(loss)
        assert math.isclose(policy.threshold, threshold), (loss, policy.threshold)
    policy.threshold = 1.0
    assert {policy.choose(s, total_steps=100) for s in range(50)} == {"student"}  # buffer not full: generate
    policy.buffer.add(collate(prompt_examples(2)))
    policy.buffer.add(collate(prompt_examples(2, seed=1)))
    # buffer full: fresh generations with probability 1 - step/total, replay otherwise
    late = [policy.choose(s, total_steps=100) for s in range(90, 100) for _ in range(1)]
    late += [policy.choose(s, m, total_steps=100) for s in range(90, 100) for m in range(1, 40)]
    assert 0.02 < late.count("student") / len(late) < 0.2 and set(late) == {"student", "replay"}


def on_policy_trainer(
    tmp_path, policy: dict, batch_size: int = 4, accumulation: int = 1, eos: int = EOS, **overrides
) -> DistillationTrainer:
    torch.manual_seed(0)
    student, teacher = tiny_gpt2(layers=1, hidden=8), tiny_gpt2(layers=2)
    student.generation_config.eos_token_id = eos
    config = DistillationConfig(token_loss={"divergence": "reverse_kl"}, policy=policy)
    args = arguments(
        tmp_path, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, **overrides
    )
    return DistillationTrainer(
        model=student, teacher_model=teacher, distillation=config, args=args, train_dataset=prompt_examples(16)
    )


class RecordInputs(TrainerCallback):
    """Each micro-batch the loss sees, with the student's greedy completions of its prompts at that moment."""

    def __init__(self, trainer: DistillationTrainer) -> None:
        self.trainer, self.seen = trainer, []
        original = trainer.compute_loss

        def compute_loss(model, inputs, *args, **kwargs):
            if model.training:
                rows = []
                for ids, labels, mask in zip(inputs["input_ids"], inputs["labels"], inputs["attention_mask"]):
                    start = int((labels != -100).int().argmax())
                    prompt, completion = ids[:start].tolist(), ids[start : int(mask.sum())].tolist()
                    was = model.training
                    model.eval()
                    rows.append((completion, greedy(model, prompt, 4)))
                    model.train(was)
                self.seen.append(rows)
            return original(model, inputs, *args, **kwargs)

        trainer.compute_loss = compute_loss


def test_on_policy_batches_are_the_students_own_completions(tmp_path):
    trainer = on_policy_trainer(tmp_path, {"student_fraction": 1.0, "temperature": 0.0, "max_new_tokens": 4})
    recorder = RecordInputs(trainer)
    trainer.args.max_steps = 4
    trainer.train()
    assert len(recorder.seen) == 4
    for rows in recorder.seen:  # every row: the student's greedy completion at that step, not the data's
        assert all(completion == reference for completion, reference in rows), rows
    assert trainer.policy.counts == {"student": 4}
    assert trainer.model.training  # generation left the student in training mode
    assert not trainer.teacher_model.training
    logged = [e for e in trainer.state.log_history if "policy/student" in e]
    assert logged and logged[-1]["policy/student"] == 4


def record_batches(trainer: DistillationTrainer) -> list[dict[str, torch.Tensor]]:
    """The training micro-batches the loss sees, recorded as the trainer runs."""
    seen = []
    original = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        if model.training:
            seen.append({k: v.clone() for k, v in inputs.items()})
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    return seen


def test_sequence_level_kd_trains_on_the_teachers_completions(tmp_path):
    trainer = on_policy_trainer(tmp_path, {"teacher_fraction": 1.0, "temperature": 0.0, "max_new_tokens": 4})
    seen = record_batches(trainer)
    trainer.args.max_steps = 2
    trainer.train()
    teacher = trainer.teacher_model
    for batch in seen:
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            start = int((labels != -100).int().argmax())
            assert ids[start : int(mask.sum())].tolist() == greedy(teacher, ids[:start].tolist(), 4)


def test_on_policy_accumulation_equals_one_large_batch(tmp_path):
    """Completions of different lengths (EOS): the token loss is normalised by the generated tokens of the whole
    accumulated batch, counted after generation."""
    policy = {"student_fraction": 1.0, "temperature": 0.0, "max_new_tokens": 5}
    data = prompt_examples(4, prompt=2)
    # an EOS the student emits early in one completion only, so that the completions differ in length
    student = on_policy_trainer(tmp_path / "probe", policy).model.eval()
    prompts = [e["input_ids"][: int((e["labels"] != -100).int().argmax())].tolist() for e in data]
    completions = [_greedy_no_eos(student, p, 5) for p in prompts]
    eos = completions[0][1]
    lengths = [c.index(eos) + 1 if eos in c else 5 for c in completions]
    assert len(set(lengths)) > 1, lengths
    results = []
    for batch_size, accumulation in ((4, 1), (1, 4)):
        trainer = on_policy_trainer(
            tmp_path / str(batch_size), policy, batch_size, accumulation, eos=eos, max_steps=1
        )
        trainer.train_dataset = data
        recorder = RecordGradients(trainer)
        trainer.add_callback(recorder)
        seen = record_batches(trainer)
        trainer.train()
        results.append((losses(trainer)[0], recorder.grads[0], seen))
    (loss_a, grads_a, (batch,)), (loss_b, grads_b, _) = results
    assert math.isclose(loss_a, loss_b, rel_tol=1e-5)
    # and it is the mean over the generated tokens (not over the data's), by a per-token loop
    fresh = on_policy_trainer(tmp_path / "reference", policy, eos=eos)
    student, teacher = fresh.model.eval(), fresh.teacher_model
    values = []
    with torch.no_grad():
        s_logits, t_logits = student(batch["input_ids"]).logits, teacher(batch["input_ids"]).logits
    for i in range(batch["input_ids"].shape[0]):
        for t in range(1, batch["input_ids"].shape[1]):
            if batch["labels"][i, t] != -100:
                log_s, log_t = s_logits[i, t - 1].log_softmax(-1), t_logits[i, t - 1].log_softmax(-1)
                values.append(float((log_s.exp() * (log_s - log_t)).sum()))
    assert len(values) == sum(lengths)
    assert math.isclose(loss_a, sum(values) / len(values), rel_tol=1e-4)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_adaptive_run_resumes_exactly_with_its_replay_buffer(tmp_path):
    policy = {"adaptive": True, "init_threshold": 1.0, "replay_capacity": 2, "max_new_tokens": 3}
    straight = on_policy_trainer(tmp_path / "a", policy, max_steps=6, save_strategy="steps", save_steps=3)
    straight.train()
    checkpoint = tmp_path / "a" / "checkpoint-3"
    saved = torch.load(checkpoint / POLICY_STATE_NAME, weights_only=True)
    assert len(saved["buffer"]["batches"]) == 2 and saved["counts"]["student"] >= 2
    assert sum(straight.policy.counts.values()) == 6 and straight.policy.counts["replay"] >= 1

    resumed = on_policy_trainer(tmp_path / "b", policy, max_steps=6)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.policy.counts == straight.policy.counts
    for a, b in zip(resumed.model.parameters(), straight.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_batch_without_completion_tokens_is_an_error_not_a_zero(tmp_path):
    trainer = on_policy_trainer(tmp_path, {})
    trainer.train_dataset = [{**e, "labels": torch.full_like(e["labels"], -100)} for e in prompt_examples(8)]
    with pytest.raises(ValueError, match="no labelled completion token"):
        trainer.train()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"student_fraction": 1.5}, "student_fraction must be a number in"),
        ({"student_fraction": 0.7, "teacher_fraction": 0.5}, "exceeds 1"),
        ({"adaptive": True, "student_fraction": 0.5}, "leave the fractions at 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer"),
        ({"student_fractoin": 0.5}, "student_fraction"),
    ],
)
def test_policy_config_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(token_loss={}, policy=fields)


def test_scored_logits_only_equals_the_full_logits_path(tmp_path):
    """Asking the models for the scored positions' logits only changes neither the loss nor the gradients."""
    results = []
    for scored_only in (True, False):
        trainer = on_policy_trainer(tmp_path / str(scored_only), {}, max_steps=1)
        trainer.distillation.label_loss_weight = 0.5
        assert trainer.scored_logits_only  # GPT-2 takes logits_to_keep
        trainer.scored_logits_only = scored_only
        recorder = RecordGradients(trainer)
        trainer.add_callback(recorder)
        trainer.train()
        results.append((losses(trainer)[0], recorder.grads[0]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert math.isclose(loss_a, loss_b, rel_tol=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_batches_after_an_evaluation_still_follow_the_policy(tmp_path):
    """Evaluation leaves the student in eval mode until the next training step: the batch fetched right after it
    must still get its completions from the policy."""
    policy = {"student_fraction": 1.0, "temperature": 0.0, "max_new_tokens": 2}
    trainer = on_policy_trainer(tmp_path, policy, max_steps=4)
    trainer.eval_dataset = prompt_examples(4)
    trainer.args.eval_strategy, trainer.args.eval_steps = IntervalStrategy.STEPS, 2
    trainer.train()
    assert trainer.policy.counts == {"student": 4}
