"""Cross-tokenizer distillation in DistillationTrainer: a character-level GPT-2 student and a word-level Llama
teacher, both tiny and built from configs, with tokenizers made in code (nothing is downloaded)."""

import copy
import math

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch  # noqa: E402
from test_policy import record_batches  # noqa: E402
from test_trainer import RecordGradients, arguments, assert_finite_and_decreasing, losses  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from fisherkd.hf import CrossTokenizerConfig, DistillationConfig, DistillationTrainer, align_batch  # noqa: E402
from fisherkd.hf.alignment import align_texts  # noqa: E402
from fisherkd.hf.cross_tokenizer import student_offsets  # noqa: E402
from fisherkd.hf.trainer import PROJECTORS_STATE_NAME  # noqa: E402
from test_alignment import byte_level_tokenizer  # noqa: E402

WORDS = ["a", "bad", "cab", "dab", "face", "bead", "fed", "ace", "deed", "cafe", "bed", "fade"]
# (prompt, completion): the completion starts with its space, so the space is trained on
TEXTS = [
    ("bad", " cab fed"),
    ("a face", " fed a bead"),
    ("deed", " ace"),
    ("cafe bed", " fade a dab cab"),
    ("fed", " a cafe"),
    ("bead a", " bad deed face"),
    ("dab", " bed"),
    ("ace fade", " cab a"),
]
LENGTH = 26  # characters + BOS + EOS of the longest text, padded to this


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Student: one token per character of 'abcdef ', BOS added, EOS and padding special."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(" abcdef")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Teacher: whole words (spaces belong to no token), unknown words as <unk>, BOS added."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


STUDENT_TOK, TEACHER_TOK = char_tokenizer(), word_tokenizer()


def student_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=len(STUDENT_TOK),
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(config)


def teacher_model(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(TEACHER_TOK),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # a sharper teacher than the near-uniform initialisation, so the loss has work to do
        model.lm_head.weight.mul_(20.0)
    return model


def example(prompt: str, completion: str) -> dict[str, torch.Tensor]:
    """Student ids of prompt + completion + EOS, right-padded to LENGTH; labels on the completion and EOS."""
    ids = STUDENT_TOK(prompt + completion)["input_ids"] + [STUDENT_TOK.eos_token_id]
    start = 1 + len(prompt)  # BOS, then one token per character
    pad = LENGTH - len(ids)
    labels = [-100] * start + ids[start:] + [-100] * pad
    return {
        "input_ids": torch.tensor(ids + [0] * pad),
        "attention_mask": torch.tensor([1] * len(ids) + [0] * pad),
        "labels": torch.tensor(labels),
    }


def dataset(texts=TEXTS) -> list[dict[str, torch.Tensor]]:
    return [example(p, c) for p, c in texts]


def trainer_for(tmp_path, cross: dict, data=None, student=None, **overrides) -> DistillationTrainer:
    settings = dict(label_loss_weight=overrides.pop("label_loss_weight", None), policy=overrides.pop("policy", None))
    config = DistillationConfig(cross_tokenizer=cross, **settings)
    return DistillationTrainer(
        model=student if student is not None else student_model(),
        teacher_model=teacher_model(),
        distillation=config,
        args=arguments(tmp_path, **overrides),
        train_dataset=data if data is not None else dataset(),
        processing_class=STUDENT_TOK,
        teacher_processing_class=TEACHER_TOK,
    )


# ----------------------------------------------------------------------------------------------------------
# Naive references: alignment through the alignment API on the texts, losses by plain loops


def naive_sorted_l1(p: list[float], q: list[float]) -> float:
    p, q = sorted(p, reverse=True), sorted(q, reverse=True)
    n = max(len(p), len(q))
    p, q = p + [0.0] * (n - len(p)), q + [0.0] * (n - len(q))
    return sum(abs(a - b) for a, b in zip(p, q))


def naive_losses(texts, loss: str) -> tuple[float, float]:
    """(mean cross-tokenizer loss over the aligned completion positions, mean student cross-entropy over the
    labelled tokens) at the models' initial weights, recomputed from the texts."""
    student, teacher = student_model().eval(), teacher_model().eval()
    full = [p + c for p, c in texts]
    aligned = align_texts(full, STUDENT_TOK, TEACHER_TOK, completion_start=[len(p) for p, _ in texts])
    batch = dataset(texts)
    with torch.no_grad():
        s_logits = student(torch.stack([e["input_ids"] for e in batch])).logits.double()
        t_logits = teacher(aligned.teacher_input_ids, attention_mask=aligned.teacher_attention_mask).logits.double()
    s_vocab, t_vocab = STUDENT_TOK.get_vocab(), TEACHER_TOK.get_vocab()
    shared = [(s_vocab[w], t_vocab[w]) for w in s_vocab if w in t_vocab]  # identical strings, specials included
    assert len(shared) == 4  # "a", "<s>", "</s>", "<pad>"
    values = []
    for b, i, j in zip(aligned.batch.tolist(), aligned.student_positions.tolist(), aligned.teacher_positions.tolist()):
        p_s, p_t = s_logits[b, i].softmax(-1).tolist(), t_logits[b, j].softmax(-1).tolist()
        if loss == "uld":
            values.append(naive_sorted_l1(p_s, p_t))
            continue
        s_ids, t_ids = {s for s, _ in shared}, {t for _, t in shared}
        q_s = [p_s[s] for s, _ in shared] + [sum(p for k, p in enumerate(p_s) if k not in s_ids)]
        q_t = [p_t[t] for _, t in shared] + [sum(p for k, p in enumerate(p_t) if k not in t_ids)]
        kl = sum(a * math.log(a / b) for a, b in zip(q_t, q_s))
        rest = naive_sorted_l1(
            [p for k, p in enumerate(p_s) if k not in s_ids], [p for k, p in enumerate(p_t) if k not in t_ids]
        )
        w_m = len(shared) / len(t_logits[b, j])
        values.append(w_m * kl + (1 - w_m) * rest)
    ce = []
    for b, e in enumerate(batch):
        for t in range(1, LENGTH):
            if e["labels"][t] != -100:
                ce.append(-float(s_logits[b, t - 1].log_softmax(-1)[e["labels"][t]]))
    return sum(values) / len(values), sum(ce) / len(ce)


# ----------------------------------------------------------------------------------------------------------
# Alignment of a student batch


def test_align_batch_pairs_completion_positions_by_hand():
    # "bad cab": student <s> b a d ␣ c a b </s> (positions 0-8), teacher <s> bad cab (0-2). The spans: "bad"
    # (student 1-3, teacher 1: the prompt, not scored) and " cab" (student 4-7, teacher 2), predicted by the
    # student at 3 ('d') and the teacher at 1 ('bad'). EOS carries no text: no pair.
    right = example("bad", " cab")
    padding = LENGTH - 9
    left = {k: v.roll(padding) for k, v in right.items()}  # the same row, left-padded
    batch = {k: torch.stack([right[k], left[k]]) for k in right}
    out = align_batch(batch, STUDENT_TOK, TEACHER_TOK)
    assert out["aligned_positions"].tolist() == [[0, 3, 1], [1, 3 + padding, 1]]
    assert out["teacher_input_ids"].tolist() == [[1, 5, 6]] * 2  # <s> bad cab for both rows
    assert out["teacher_attention_mask"].tolist() == [[1, 1, 1]] * 2
    # the teacher truncated to <s> bad: " cab" is beyond its text, nothing is compared
    short = align_batch(batch, STUDENT_TOK, TEACHER_TOK, max_length=2)
    assert short["teacher_input_ids"].tolist() == [[1, 5]] * 2 and short["aligned_positions"].shape == (0, 3)
    # a completion starting inside the prompt's last word: "ba" + "d cab" pairs nothing for "bad"
    batch = {k: v[None] for k, v in example("ba", "d cab").items()}
    assert align_batch(batch, STUDENT_TOK, TEACHER_TOK)["aligned_positions"].tolist() == [[0, 3, 1]]


def test_student_offsets_of_a_non_canonical_split_come_from_decoding():
    tok = byte_level_tokenizer()  # merges "hello" into one token; here it arrives as five single letters
    ids = [tok.convert_tokens_to_ids(c) for c in "hello"] + tok.convert_tokens_to_ids(["Ġworld"])
    text, offsets, keep = student_offsets(tok, ids)
    assert text == "hello world"
    assert offsets == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 11)] and all(keep)
    canonical = tok("hello world", add_special_tokens=False)["input_ids"]
    assert student_offsets(tok, canonical)[1] == [(0, 5), (5, 11)]


# ----------------------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("loss", ["uld", "span_kl"])
def test_the_trainer_trains_across_tokenizers(tmp_path, loss):
    trainer = trainer_for(tmp_path, {"loss": loss}, label_loss_weight=1.0, max_steps=15, learning_rate=1e-2)
    trainer.train()
    assert_finite_and_decreasing(losses(trainer))
    assert {f"distill/{loss}", "distill/label"} <= set(trainer.state.log_history[0])
    terms = [e[f"distill/{loss}"] for e in trainer.state.log_history if f"distill/{loss}" in e]
    assert sum(terms[-3:]) < sum(terms[:3]), terms  # the cross-tokenizer term itself goes down
    assert math.isfinite(trainer.evaluate(dataset(TEXTS[:4]))["eval_loss"])


@pytest.mark.parametrize("scored_logits_only", [True, False])
@pytest.mark.parametrize("loss", ["uld", "span_kl"])
def test_the_loss_of_a_batch_is_the_naive_recomputation(tmp_path, loss, scored_logits_only):
    trainer = trainer_for(
        tmp_path, {"loss": loss}, max_steps=1, per_device_train_batch_size=8, per_device_eval_batch_size=8
    )
    # True: both LM heads at the scored / aligned positions only (logits_to_keep); False: full logits
    assert trainer.scored_logits_only
    trainer.scored_logits_only = scored_logits_only
    expected, ce = naive_losses(TEXTS, loss)  # the order of the examples does not change the means
    weight, label_weight = (1.5, 1.0) if loss == "uld" else (1.0, 0.0)  # the authors' defaults
    # evaluation aligns in compute_loss and divides by the batch's own pairs; training counts them beforehand
    assert math.isclose(trainer.evaluate(dataset())["eval_loss"], weight * expected + label_weight * ce, rel_tol=1e-5)
    trainer.train()
    first = trainer.state.log_history[0]
    assert math.isclose(first[f"distill/{loss}"], weight * expected, rel_tol=1e-5)
    assert math.isclose(first["loss"], weight * expected + label_weight * ce, rel_tol=1e-5)
    assert ("distill/label" in first) == (loss == "uld")


def first_step(tmp_path, loss: str, batch_size: int, accumulation: int):
    trainer = trainer_for(
        tmp_path,
        {"loss": loss},
        data=dataset(TEXTS[:4]),
        label_loss_weight=1.0,
        max_steps=1,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
    )
    recorder = RecordGradients(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    return trainer.state.log_history[0], recorder.grads[0]


@pytest.mark.parametrize("loss", ["uld", "span_kl", "dskd"])
def test_gradient_accumulation_equals_one_large_batch(tmp_path, loss):
    # the four texts have 2, 3, 1 and 4 aligned completion spans: the normalisation must use the total, 10
    one, grads_one = first_step(tmp_path / "one", loss, batch_size=4, accumulation=1)
    four, grads_four = first_step(tmp_path / "four", loss, batch_size=1, accumulation=4)
    for name in ("loss", f"distill/{loss}", "distill/label"):
        assert math.isclose(one[name], four[name], rel_tol=1e-5), (name, one[name], four[name])
    assert len(grads_one) == len(grads_four)
    for a, b in zip(grads_one, grads_four):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_the_spans_of_the_accumulation_test_are_as_counted():
    batch = {k: torch.stack([e[k] for e in dataset(TEXTS[:4])]) for k in ("input_ids", "attention_mask", "labels")}
    rows = align_batch(batch, STUDENT_TOK, TEACHER_TOK)["aligned_positions"][:, 0]
    assert torch.bincount(rows).tolist() == [2, 3, 1, 4]


def language_student() -> torch.nn.Module:
    """The student after 40 Adam steps of cross-entropy on the texts: its greedy completions hold spaces and
    words, so that the teacher's word tokens and the student's characters share boundaries in them (the
    untrained student repeats one letter: one unknown word, nothing to align)."""
    student = student_model()
    batch = {k: torch.stack([e[k] for e in dataset()]) for k in ("input_ids", "attention_mask", "labels")}
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    for _ in range(40):
        optimizer.zero_grad()
        student(**batch).loss.backward()
        optimizer.step()
    return student


def test_on_policy_the_teacher_reads_the_text_of_the_students_completions(tmp_path):
    policy = {"student_fraction": 1.0, "temperature": 0.0, "max_new_tokens": 6}
    trainer = trainer_for(tmp_path, {"loss": "uld"}, student=language_student(), policy=policy, max_steps=3)
    seen = record_batches(trainer)
    teacher_inputs = []
    trainer.teacher_model.register_forward_pre_hook(
        lambda module, args, kwargs: teacher_inputs.append(kwargs["input_ids"].clone()), with_kwargs=True
    )
    trainer.train()
    assert trainer.policy.counts == {"student": 3} and len(seen) == 3 == len(teacher_inputs)
    assert all(math.isfinite(v) for v in losses(trainer))
    data = {tuple(e["input_ids"].tolist()) for e in dataset()}
    pairs = 0
    for batch, teacher_ids in zip(seen, teacher_inputs):
        pairs += len(batch["aligned_positions"])
        for ids, mask, t_ids in zip(batch["input_ids"], batch["attention_mask"], teacher_ids):
            row = ids[mask.bool()].tolist()
            assert tuple(row + [0] * (LENGTH - len(row))) not in data  # not the data's completion
            text = STUDENT_TOK.decode(row, skip_special_tokens=True)
            expected = TEACHER_TOK(text)["input_ids"]
            assert t_ids[: len(expected)].tolist() == expected  # the teacher's tokens of the student's text
            assert set(t_ids[len(expected) :].tolist()) <= {TEACHER_TOK.pad_token_id}
    assert pairs > 0
    assert trainer.model.training and not trainer.teacher_model.training


def test_on_policy_completions_are_greedy_from_the_student(tmp_path):
    policy = {"student_fraction": 1.0, "temperature": 0.0, "max_new_tokens": 5}
    trainer = trainer_for(
        tmp_path, {"loss": "uld"}, student=language_student(), policy=policy, max_steps=1, learning_rate=0.0
    )
    seen = record_batches(trainer)
    trainer.train()
    student = trainer.model.eval()
    for ids, labels, mask in zip(seen[0]["input_ids"], seen[0]["labels"], seen[0]["attention_mask"]):
        start = int((labels != -100).int().argmax())
        prompt, completion = ids[:start].tolist(), ids[start : int(mask.sum())].tolist()
        reference = list(prompt)
        with torch.no_grad():
            for _ in range(5):
                reference.append(int(student(torch.tensor([reference])).logits[0, -1].argmax()))
                if reference[-1] == STUDENT_TOK.eos_token_id:
                    break
        assert completion == reference[len(prompt) :]


# ----------------------------------------------------------------------------------------------------------
# Errors and defaults


def test_vocabulary_mismatch_names_both_sizes_and_the_cross_tokenizer_methods(tmp_path):
    config = DistillationConfig(token_loss={})
    with pytest.raises(ValueError) as error:
        DistillationTrainer(
            model=student_model(), teacher_model=teacher_model(), distillation=config, args=arguments(tmp_path)
        )
    message = str(error.value)
    assert "student vocabulary size 10 differs from teacher vocabulary size 16" in message
    assert "cross_tokenizer={'loss': 'uld'}" in message and "'span_kl'" in message
    assert "teacher_processing_class=" in message and "\n" not in message


def test_defaults_are_the_authors():
    uld = DistillationConfig(cross_tokenizer={"loss": "uld"})
    assert uld.cross_tokenizer.weight == 1.5 and uld.label_loss_weight == 1.0 and uld.cross_tokenizer.temperature == 1
    gold = DistillationConfig(cross_tokenizer={"loss": "span_kl"})
    assert gold.cross_tokenizer.weight == 1.0 and gold.label_loss_weight == 0.0
    assert gold.cross_tokenizer.matched_weight is None  # adaptive K / V_t
    assert DistillationConfig(cross_tokenizer={}, label_loss_weight=0.0).label_loss_weight == 0.0
    assert DistillationConfig(token_loss={}).label_loss_weight == 0.0
    assert isinstance(uld.cross_tokenizer, CrossTokenizerConfig)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(cross_tokenizer={"loss": "ul"}), r"cross_tokenizer loss 'ul' is unknown; did you mean: uld"),
        (dict(cross_tokenizer={"temprature": 2}), r"cross_tokenizer has no field 'temprature'; did you mean: temp"),
        (dict(cross_tokenizer={"temperature": 0}), r"cross_tokenizer temperature must be a number > 0, got 0"),
        (dict(cross_tokenizer={"weight": -1.0}), r"cross_tokenizer weight must be a number >= 0, got -1.0"),
        (dict(cross_tokenizer={"chunk_size": 0}), r"cross_tokenizer chunk_size must be a positive integer"),
        (dict(cross_tokenizer={"loss": "span_kl", "top_k": 5}), r"top_k is for loss 'uld'"),
        (dict(cross_tokenizer={"teacher_max_length": 0}), r"teacher_max_length must be a positive integer or None"),
        (dict(cross_tokenizer={"matched_weight": 0.5, "unmatched_weight": 0.5}), r"are for loss 'span_kl'"),
        (dict(cross_tokenizer={"loss": "span_kl", "matched_weight": 0.5}), r"give both matched_weight and unm"),
        (dict(cross_tokenizer={}, token_loss={}), r"cross_tokenizer replaces token_loss"),
        (dict(cross_tokenizer={}, methods=["minilm"]), r"cross_tokenizer takes no methods"),
        (dict(cross_tokenizer={}, policy={"teacher_fraction": 0.5}), r"teacher_fraction > 0 .* not supported"),
        (dict(cross_tokenizer="uld"), r"cross_tokenizer must be a CrossTokenizerConfig, a dict"),
    ],
)
def test_config_errors(fields, message):
    with pytest.raises(ValueError, match=message) as error:
        DistillationConfig(**fields)
    assert "\n" not in str(error.value)


def test_trainer_errors(tmp_path):
    args = arguments(tmp_path)
    config = DistillationConfig(cross_tokenizer={"loss": "uld"})
    make = dict(model=student_model(), teacher_model=teacher_model(), args=args)
    with pytest.raises(ValueError, match=r"needs both tokenizers: pass teacher_processing_class="):
        DistillationTrainer(**make, distillation=config, processing_class=STUDENT_TOK)
    with pytest.raises(ValueError, match=r"needs both tokenizers: pass processing_class="):
        DistillationTrainer(**make, distillation=config, teacher_processing_class=TEACHER_TOK)
    with pytest.raises(ValueError, match=r"processing_class has 16 tokens but its model predicts 10"):
        DistillationTrainer(
            **make, distillation=config, processing_class=TEACHER_TOK, teacher_processing_class=STUDENT_TOK
        )
    with pytest.raises(ValueError, match=r"teacher_processing_class is read only for cross-tokenizer"):
        DistillationTrainer(
            model=student_model(),
            teacher_model=student_model(),
            args=args,
            distillation=DistillationConfig(token_loss={}),
            teacher_processing_class=STUDENT_TOK,
        )


# ----------------------------------------------------------------------------------------------------------
# DSKD: projectors between the hidden spaces, trained with the student and checkpointed beside it


def narrow_student(seed: int = 0) -> torch.nn.Module:
    """The student with hidden size 8 (the teacher's is 16), so that the projectors change the width."""
    config = student_model().config
    config.n_embd = 8
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config)


def dskd_trainer(tmp_path, **overrides) -> DistillationTrainer:
    student = overrides.pop("student", None) or narrow_student()
    return trainer_for(tmp_path, {"loss": "dskd"}, student=student, **overrides)


def naive_dskd(texts, projectors, temperature: float = 2.0) -> tuple[float, float]:
    """(mean DSKD loss over the aligned completion pairs, mean student cross-entropy) at the initial weights:
    hidden states, heads and projectors in float64, the three terms written out pair by pair."""
    student, teacher = narrow_student().eval().double(), teacher_model().eval().double()
    projectors = copy.deepcopy(projectors).double()
    full = [p + c for p, c in texts]
    aligned = align_texts(full, STUDENT_TOK, TEACHER_TOK, completion_start=[len(p) for p, _ in texts])
    batch = dataset(texts)
    with torch.no_grad():
        s_out = student(torch.stack([e["input_ids"] for e in batch]), output_hidden_states=True)
        t_out = teacher(
            aligned.teacher_input_ids, attention_mask=aligned.teacher_attention_mask, output_hidden_states=True
        )
        values = []
        for b, i, j in zip(
            aligned.batch.tolist(), aligned.student_positions.tolist(), aligned.teacher_positions.tolist()
        ):
            y = int(batch[b]["labels"][i + 1])
            u = teacher.lm_head.weight @ projectors.student_to_teacher(s_out.hidden_states[-1][b, i])
            v = student.lm_head.weight @ projectors.teacher_to_student(t_out.hidden_states[-1][b, j])
            p_t = torch.softmax(t_out.logits[b, j] / temperature, 0)
            p_u = torch.softmax(u / temperature, 0)
            p_s = torch.softmax(s_out.logits[b, i] / temperature, 0)
            q = torch.softmax(v / temperature, 0)
            teacher_space = float((p_t * (p_t / p_u).log()).sum())
            student_space = float((q * (q / p_s).log()).sum()) if int(v.argmax()) == y else 0.0
            values.append(teacher_space + student_space - float(torch.log_softmax(v, 0)[y]))
        ce = []
        for b, e in enumerate(batch):
            for t in range(1, LENGTH):
                if e["labels"][t] != -100:
                    ce.append(-float(s_out.logits[b, t - 1].log_softmax(-1)[e["labels"][t]]))
    return sum(values) / len(values), sum(ce) / len(ce)


def test_dskd_defaults_are_the_authors():
    config = DistillationConfig(cross_tokenizer={"loss": "dskd"})
    c = config.cross_tokenizer
    assert (c.weight, config.label_loss_weight, c.temperature, c.correct_only) == (0.5, 0.5, 2.0, True)
    assert DistillationConfig(cross_tokenizer={"loss": "dskd", "temperature": 1.0}).cross_tokenizer.temperature == 1
    assert DistillationConfig(cross_tokenizer={"loss": "uld"}).cross_tokenizer.correct_only is None
    with pytest.raises(ValueError, match=r"^cross_tokenizer correct_only is for loss 'dskd'$"):
        DistillationConfig(cross_tokenizer={"loss": "uld", "correct_only": True})
    with pytest.raises(ValueError, match=r"correct_only must be True, False or None, got 1"):
        DistillationConfig(cross_tokenizer={"loss": "dskd", "correct_only": 1})


@pytest.mark.parametrize("scored_logits_only", [True, False])
def test_dskd_loss_of_a_batch_is_the_naive_recomputation(tmp_path, scored_logits_only):
    trainer = dskd_trainer(tmp_path, max_steps=1, per_device_train_batch_size=8, per_device_eval_batch_size=8)
    assert trainer.scored_logits_only
    trainer.scored_logits_only = scored_logits_only
    expected, ce = naive_dskd(TEXTS, trainer.dskd_projectors)
    assert math.isclose(trainer.evaluate(dataset())["eval_loss"], 0.5 * expected + 0.5 * ce, rel_tol=1e-5)
    trainer.train()
    first = trainer.state.log_history[0]
    assert math.isclose(first["distill/dskd"], 0.5 * expected, rel_tol=1e-5)
    assert math.isclose(first["loss"], 0.5 * expected + 0.5 * ce, rel_tol=1e-5)


def test_dskd_trains_the_student_and_both_projectors_not_the_teacher(tmp_path):
    trainer = dskd_trainer(tmp_path, max_steps=15, learning_rate=1e-2)
    projectors = trainer.dskd_projectors
    assert projectors.student_to_teacher.weight.shape == (16, 8)
    assert projectors.teacher_to_student.weight.shape == (8, 16)
    optimized = {id(p) for group in trainer.create_optimizer().param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in projectors.parameters())
    assert not any(id(p) in optimized for p in trainer.teacher_model.parameters())
    start = copy.deepcopy(projectors.state_dict())
    teacher = copy.deepcopy(trainer.teacher_model.state_dict())
    trainer.train()
    assert_finite_and_decreasing(losses(trainer))
    terms = [e["distill/dskd"] for e in trainer.state.log_history if "distill/dskd" in e]
    assert sum(terms[-3:]) < sum(terms[:3]), terms
    assert all(not torch.equal(start[k], v) for k, v in projectors.state_dict().items())  # every tensor moved
    assert all(p.grad is None for p in projectors.parameters())  # cleared after every step
    assert all(torch.equal(teacher[k], v) for k, v in trainer.teacher_model.state_dict().items())
    assert not any("to_teacher" in k or "to_student" in k for k in trainer.model.state_dict())  # a plain student
    assert math.isfinite(trainer.evaluate(dataset(TEXTS[:4]))["eval_loss"])


def test_only_dskd_asks_the_models_for_hidden_states(tmp_path):
    for loss, expected in (("uld", None), ("span_kl", None), ("dskd", True)):
        trainer = trainer_for(tmp_path / loss, {"loss": loss}, student=narrow_student(), max_steps=1)
        seen = []
        for model in (trainer.model, trainer.teacher_model):
            model.register_forward_pre_hook(
                lambda module, args, kwargs, seen=seen: seen.append(kwargs.get("output_hidden_states")),
                with_kwargs=True,
            )
        trainer.train()
        assert seen == [expected, expected], (loss, seen)


def test_dskd_checkpoint_holds_the_projectors_and_resumes_exactly(tmp_path):
    straight = dskd_trainer(tmp_path / "a", max_steps=6, learning_rate=1e-2, save_strategy="steps", save_steps=3)
    straight.train()
    checkpoint = tmp_path / "a" / "checkpoint-3"
    saved = torch.load(checkpoint / PROJECTORS_STATE_NAME)
    assert set(saved) == {f"{p}.{w}" for p in ("student_to_teacher", "teacher_to_student") for w in ("weight", "bias")}

    resumed = dskd_trainer(tmp_path / "b", max_steps=6, learning_rate=1e-2)
    fresh = copy.deepcopy(resumed.dskd_projectors.state_dict())
    resumed._load_from_checkpoint(str(checkpoint))
    restored = resumed.dskd_projectors.state_dict()
    assert all(torch.equal(restored[k], saved[k]) and not torch.equal(fresh[k], saved[k]) for k in saved)

    resumed.train(resume_from_checkpoint=str(checkpoint))
    final, expected = resumed.dskd_projectors.state_dict(), straight.dskd_projectors.state_dict()
    for k in expected:
        torch.testing.assert_close(final[k], expected[k], rtol=1e-5, atol=1e-6)
    for a, b in zip(resumed.model.parameters(), straight.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.warns(UserWarning, match=r"has no fisherkd_projectors.pt: DSKD's projectors start afresh"):
        dskd_trainer(tmp_path / "c")._load_projectors(str(tmp_path))


def test_dskd_on_policy_trains_on_the_students_completions(tmp_path):
    policy = {"student_fraction": 1.0, "temperature": 0.0, "max_new_tokens": 6}
    student = language_student()
    trainer = dskd_trainer(tmp_path, student=student, policy=policy, max_steps=3)
    seen = record_batches(trainer)
    trainer.train()
    assert trainer.policy.counts == {"student": 3}
    assert sum(len(b["aligned_positions"]) for b in seen) > 0
    assert all(math.isfinite(e["distill/dskd"]) for e in trainer.state.log_history if "distill/dskd" in e)
