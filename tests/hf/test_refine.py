"""MiniPLM difference sampling (fisherkd.hf.refine, ``fisherkd refine-data``) on tiny random models and hand-made
tokenizers: a word-level one for a GPT-2 teacher (no BOS) and a character-level one with a BOS for a Llama
reference, so the two models read each document with different tokenizers."""

import json
import re
import string

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import torch  # noqa: E402

from fisherkd.cli import main  # noqa: E402
from fisherkd.errors import UserError  # noqa: E402
from fisherkd.hf.refine import difference_sampling, read_corpus, refine_corpus, score_documents  # noqa: E402

WORDS = ["[UNK]", "[BOS]", "the", "cat", "dog", "sat", "on", "mat", "a", "ran", "to", "and", "red", "big", "hat"]
CHARS = ["[UNK]", "[BOS]", *string.ascii_lowercase, " ", ".", ","]

CORPUS = [
    "the cat sat on the mat",
    "a dog ran to the cat and the dog sat",
    "",  # no token for the teacher, only BOS for the reference: unscored
    "big red hat",
    "the big dog and the red cat ran on a mat to the hat and sat on the big red mat",  # longer than max_length
    "cat",
    "a mat, a hat.",
    "dog dog dog dog dog dog dog",
    "the hat sat on a dog",
]


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    tok = tokenizers.Tokenizer(tokenizers.models.BPE({c: i for i, c in enumerate(CHARS)}, merges=[], unk_token="[UNK]"))
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]")


def tiny_gpt2(seed: int = 0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=len(WORDS), n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=1
    )
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 1) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(CHARS),
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(config).eval()


def naive_scores(model, tokenizer, texts, max_length: int) -> list[float | None]:
    """One forward per predicted token: token t (t ≥ 1) is predicted from its window's prefix, the windows
    starting at multiples of max_length − 1; mean of log p over the n − 1 predicted tokens."""
    out = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        total = 0.0
        for t in range(1, len(ids)):
            start = (t - 1) // (max_length - 1) * (max_length - 1)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids[start:t]])).logits[0, -1]
            total += torch.log_softmax(logits.double(), -1)[ids[t]].item()
        out.append(total / (len(ids) - 1) if len(ids) > 1 else None)
    return out


def assert_scores_close(got, want):
    assert [g is None for g in got] == [w is None for w in want]
    assert [g for g in got if g is not None] == pytest.approx([w for w in want if w is not None], rel=1e-5, abs=1e-5)


def test_tokenizers_are_what_the_tests_assume():
    assert word_tokenizer()("the cat")["input_ids"] == [2, 3]  # no BOS
    assert char_tokenizer()("ab")["input_ids"] == [1, 2, 3]  # BOS, a, b
    assert len(word_tokenizer()(CORPUS[4])["input_ids"]) > 8 and len(char_tokenizer()(CORPUS[1])["input_ids"]) > 8


@pytest.mark.parametrize("chunked", [True, False])  # windows of 8 tokens, or the model's whole context (all fit)
@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_score_is_the_mean_token_log_likelihood_of_a_naive_loop(which, chunked):
    model, tokenizer = (tiny_gpt2(), word_tokenizer()) if which == "gpt2" else (tiny_llama(), char_tokenizer())
    max_length = 8 if chunked else model.config.max_position_embeddings
    assert chunked or max(len(tokenizer(t)["input_ids"]) for t in CORPUS) <= max_length
    got = score_documents(model, tokenizer, CORPUS, batch_size=3, max_length=max_length)
    assert_scores_close(got, naive_scores(model, tokenizer, CORPUS, max_length))
    assert got[2] is None and got[5] is None if which == "gpt2" else got[2] is None


def test_difference_sampling_keeps_the_top_fraction_by_difference():
    diff = [0.5, None, 2.0, -1.0, 2.0, 0.1]  # 5 scored
    assert difference_sampling(diff, 0.5) == [False, False, True, False, True, False]  # floor(2.5) = 2
    assert difference_sampling(diff, 0.2) == [False, False, True, False, False, False]  # a tie keeps corpus order
    assert difference_sampling(diff, 0.61) == [True, False, True, False, True, False]  # floor(3.05) = 3
    assert difference_sampling(diff, 1.0) == [True, False, True, True, True, True]  # never the unscored one
    assert difference_sampling(diff, 0.01) == [False, False, True, False, False, False]  # at least one
    assert sum(difference_sampling([float(i) for i in range(100)], 0.29)) == 29  # not floor(28.999...)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(UserError, match=r"keep ratio must be in \(0, 1\]"):
            difference_sampling(diff, bad)


def run(output, teacher=None, reference=None, keep_ratio=0.5, **kwargs):
    return refine_corpus(
        teacher or tiny_gpt2(),
        reference or tiny_llama(),
        word_tokenizer(),
        CORPUS,
        keep_ratio,
        output,
        reference_tokenizer=char_tokenizer(),
        batch_size=2,
        max_length=8,
        **kwargs,
    )


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_refined_corpus_is_the_top_half_by_naive_difference(tmp_path):
    report = run(tmp_path)
    teacher = naive_scores(tiny_gpt2(), word_tokenizer(), CORPUS, 8)
    reference = naive_scores(tiny_llama(), char_tokenizer(), CORPUS, 8)
    diff = {i: t - r for i, (t, r) in enumerate(zip(teacher, reference)) if t is not None and r is not None}
    assert sorted(diff) == [0, 1, 3, 4, 6, 7, 8]  # "" and "cat" (one word, no BOS) are unscored
    want = sorted(sorted(diff, key=lambda i: -diff[i])[:3])  # floor(0.5 · 7) = 3
    refined = rows(tmp_path / "refined.jsonl")
    assert [row["index"] for row in refined] == want
    assert [row["text"] for row in refined] == [CORPUS[i] for i in want]
    assert [row["difference"] for row in refined] == pytest.approx([diff[i] for i in want], abs=1e-5)
    assert (report["documents"], report["scored"], report["unscored"], report["kept"]) == (9, 7, 2, 3)
    assert report["threshold"] == pytest.approx(min(diff[i] for i in want), abs=1e-5)
    assert report["tokenizers_differ"] is True
    highest = report["examples"]["highest_kept"][0]
    assert highest["index"] == max(diff, key=diff.get)
    assert report["examples"]["lowest_dropped"][0]["index"] == min(diff, key=diff.get)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert "Highest dropped" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "differences.png").read_bytes()[:4] == b"\x89PNG"


class Interrupt(Exception):
    pass


def counting(model, fail_after: int | None = None) -> list[int]:
    """Patch ``model.forward`` to record its batch sizes, raising :class:`Interrupt` on call ``fail_after + 1``."""
    calls: list[int] = []
    forward = model.forward

    def wrapped(*args, **kwargs):
        if fail_after is not None and len(calls) == fail_after:
            raise Interrupt
        calls.append(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    model.forward = wrapped
    return calls


def test_an_interrupted_run_resumes_to_the_same_output_without_rescoring(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run(whole)

    windows = [-(-(len(char_tokenizer()(t)["input_ids"]) - 1) // 7) for t in CORPUS]  # of 8 tokens, overlap 1
    reference = tiny_llama()
    # two batches of two documents scored (each batch's windows two per forward), then the run dies
    counting(reference, fail_after=-(-sum(windows[:2]) // 2) + -(-sum(windows[2:4]) // 2))
    with pytest.raises(Interrupt):
        run(cut, reference=reference)
    assert [row["index"] for row in rows(cut / "scores_reference.jsonl")] == [0, 1, 2, 3]
    assert not (cut / "refined.jsonl").exists()
    with (cut / "scores_reference.jsonl").open("a") as f:
        f.write('{"index": 4, "sha1": "ab')  # a torn line from a crash mid-write

    teacher, reference = tiny_gpt2(), tiny_llama()
    teacher_calls, reference_calls = counting(teacher), counting(reference)
    run(cut, teacher=teacher, reference=reference)
    assert teacher_calls == []  # the teacher had finished
    assert sum(reference_calls) == sum(windows[4:])  # only the windows of documents 4..8 were scored again
    for name in ("refined.jsonl", "report.json", "report.md", "scores_teacher.jsonl", "scores_reference.jsonl"):
        assert (cut / name).read_text() == (whole / name).read_text(), name


def test_a_checkpoint_is_not_mixed_with_other_settings_or_another_corpus(tmp_path):
    run(tmp_path)
    with pytest.raises(UserError, match="other settings \\(max_length\\)"):
        refine_corpus(tiny_gpt2(), tiny_llama(), word_tokenizer(), CORPUS, 0.5, tmp_path, max_length=16)
    (tmp_path / "meta.json").unlink()
    with pytest.raises(UserError, match="scored another corpus \\(document 0 differs\\)"):
        refine_corpus(tiny_gpt2(), tiny_llama(), word_tokenizer(), ["x", *CORPUS[1:]], 0.5, tmp_path, max_length=8)


def test_input_errors(tmp_path):
    with pytest.raises(UserError, match="the corpus is empty"):
        refine_corpus(tiny_gpt2(), tiny_llama(), word_tokenizer(), ["", "  "], 0.5, tmp_path)
    with pytest.raises(UserError, match="exceeds the model's 32 positions"):
        refine_corpus(tiny_gpt2(), tiny_llama(), word_tokenizer(), CORPUS, 0.5, tmp_path, max_length=64)
    with pytest.raises(UserError, match="keep ratio"):
        run(tmp_path, keep_ratio=0)


def save_models(tmp_path):
    folders = {}
    for name, model, tokenizer in (("teacher", tiny_gpt2(), word_tokenizer()), ("ref", tiny_llama(), char_tokenizer())):
        folders[name] = tmp_path / name
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


def test_cli_end_to_end_on_jsonl_and_a_txt_folder(tmp_path, capsys):
    folders = save_models(tmp_path)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(CORPUS)))
    args = ["refine-data", "--teacher", str(folders["teacher"]), "--reference", str(folders["ref"])]
    args += ["--batch-size", "2", "--max-length", "8", "--device", "cpu"]
    assert main([*args, "--corpus", str(corpus), "--keep-ratio", "0.5", "--output", str(tmp_path / "out")]) == 0
    assert "kept 3 of 9 documents" in " ".join(capsys.readouterr().out.split())
    run(tmp_path / "api")  # the same models, through the Python function
    assert (tmp_path / "out" / "refined.jsonl").read_text() == (tmp_path / "api" / "refined.jsonl").read_text()

    texts = tmp_path / "texts"
    (texts / "sub").mkdir(parents=True)
    for i, text in enumerate(CORPUS):
        (texts / ("sub" if i % 2 else "") / f"{i:02d}.txt").write_text(text)
    assert read_corpus(texts) == [CORPUS[i] for i in (0, 2, 4, 6, 8, 1, 3, 5, 7)]  # sorted paths: 0?.txt < sub/
    assert main([*args, "--corpus", str(texts), "--keep-ratio", "1", "--output", str(tmp_path / "txt")]) == 0
    assert len(rows(tmp_path / "txt" / "refined.jsonl")) == 7  # every scored document


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--keep-ratio": "0"}, r"--keep-ratio must be in \(0, 1\]"),
        ({"--keep-ratio": "1.5"}, r"--keep-ratio must be in \(0, 1\]"),
        ({"--corpus": "missing.jsonl"}, r"corpus .*missing.jsonl does not exist"),
        ({"--corpus": "empty.jsonl"}, r"corpus .*empty.jsonl is empty"),
        ({"--corpus": "bad.jsonl"}, r"bad.jsonl line 2 is not JSON"),
        ({"--corpus": "notext.jsonl"}, r"notext.jsonl line 1 has no 'text' string"),
        ({"--teacher": "nowhere"}, r"--teacher .*nowhere does not exist: give a local Hugging Face model folder"),
        ({"--reference": "corpus.jsonl"}, r"--reference .*corpus.jsonl is neither a .gguf file nor a folder"),
        ({"--batch-size": "0"}, r"argument --batch-size: must be at least 1"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, change, message):
    folders = save_models(tmp_path)
    capsys.readouterr()  # save_pretrained's progress bars
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"text": "the cat"}) + "\n")
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": " "}) + "\n\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "the cat"}) + "\n{oops\n")
    (tmp_path / "notext.jsonl").write_text(json.dumps({"body": "the cat"}) + "\n")
    options = {
        "--teacher": str(folders["teacher"]),
        "--reference": str(folders["ref"]),
        "--corpus": "corpus.jsonl",
        "--keep-ratio": "0.5",
        "--output": str(tmp_path / "out"),
        "--device": "cpu",
    }
    options.update(change)
    for key in ("--corpus", "--reference", "--teacher"):
        if not options[key].startswith("/"):
            options[key] = str(tmp_path / options[key])
    assert main(["refine-data", *[x for kv in options.items() for x in kv]]) == 2
    err = capsys.readouterr().err.splitlines()  # Transformers' loading bars may come first, on their own lines
    assert err[-1].startswith("error: ") and sum("error" in line for line in err) == 1, err
    assert re.search(message, err[-1]), err


def test_one_tokenizer_for_both_models(tmp_path):
    report = refine_corpus(tiny_gpt2(0), tiny_gpt2(1), word_tokenizer(), CORPUS, 1.0, tmp_path, max_length=8)
    assert report["tokenizers_differ"] is False  # another instance of the same vocabulary
    assert (report["scored"], report["kept"]) == (7, 7)
