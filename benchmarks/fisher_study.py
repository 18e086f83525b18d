"""Pre-registered study: does the teacher's Fisher, as a metric or as a weight, beat the best scale-controlled
unweighted baseline?

    python benchmarks/fisher_study.py [--testbed mnist1d] [--seeds 5] [--workers 2] [--dry-run]

The testbed's config (``benchmarks/configs/fisher_study_<testbed>.yaml``) fixes the data, teacher, student, budget
and the arms; every arm runs with the same seeds, and every comparison below is paired by seed: the mean of the
per-seed differences with its 95% t interval (:mod:`fisherkd.stats`). Written before the first run:

  Baselines. "best KD" is the arm among ``kd x1 .. kd x8`` with the highest mean (the scale control: mean-1 weights
  give up the loss-scale effect); "best hint" the better of ``kd + hint x1`` and ``kd + hint x4``; "best
  unweighted" the best of all of these.
  C1 (sample and class weights): each ``kd, sample ...`` arm − best KD.
  C2 (the hint's metric): each ``kd + hint, ...`` arm − best hint.
  C3 (where the hint's value lies, the pilot's question): null space − row space; Fisher complement − Fisher
     directions.
  C4 (the issue's bar): ``kd + head_kd`` − best unweighted, and each Fisher arm (C1, C2) − best unweighted.
  A comparison "wins" when its interval lies above 0 and "loses" when below; otherwise it is a tie. All are
  reported, negatives included. The best arm is chosen on the test split, which favours the baselines.

Writes ``benchmarks/results/fisher_study_<testbed>/results.{json,md}`` with device, versions and commit.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

from fisherkd.config import build_config
from fisherkd.provenance import provenance
from fisherkd.stats import PairedDifference, paired_difference

ROOT = Path(__file__).resolve().parent
KD_SCALES = ("kd x1", "kd x2", "kd x4", "kd x8")
HINT_SCALES = ("kd + hint x1", "kd + hint x4")


def run_configs(raw: dict, seeds: int) -> dict[tuple[str, int], dict]:
    """One run config per (arm, seed): the base with the arm's methods."""
    base = {k: v for k, v in raw.items() if k not in ("arms", "hint")}
    configs = {}
    for arm, methods in raw["arms"].items():
        for seed in range(seeds):
            config = copy.deepcopy(base)
            config |= {"name": f"{raw['name']}-{arm}-seed{seed}".replace(" ", "_").replace(",", ""), "seed": seed,
                       "methods": methods, "output_dir": f"runs/{raw['name']}"}
            configs[arm, seed] = config
    return configs


def accuracy(config: dict) -> float:
    import torch

    from fisherkd.run import train

    torch.set_num_threads(1)
    return 100 * train(build_config(config))["test_accuracy"]


def verdict(d: PairedDifference) -> str:
    return "wins" if d.low > 0 else "loses" if d.high < 0 else "ties"


def analyse(results: dict[str, list[float]]) -> dict[str, dict]:
    mean = {arm: statistics.fmean(v) for arm, v in results.items()}
    best_kd = max(KD_SCALES, key=mean.__getitem__)
    best_hint = max(HINT_SCALES, key=mean.__getitem__)
    best_unweighted = max((*KD_SCALES, *HINT_SCALES), key=mean.__getitem__)
    comparisons: dict[str, tuple[str, str]] = {}
    for arm in results:
        if arm.startswith("kd, "):
            comparisons[f"C1: {arm} − best KD ({best_kd})"] = (arm, best_kd)
        if arm.startswith("kd + hint, "):
            comparisons[f"C2: {arm} − best hint ({best_hint})"] = (arm, best_hint)
    pairs_c3 = [("kd + hint, head null space", "kd + hint, head row space"),
                ("kd + hint, Fisher complement", "kd + hint, Fisher directions")]
    for a, b in pairs_c3:
        comparisons[f"C3: {a} − {b}"] = (a, b)
    for arm in results:
        if arm == "kd + head_kd" or arm.startswith(("kd, ", "kd + hint, ")):
            comparisons[f"C4: {arm} − best unweighted ({best_unweighted})"] = (arm, best_unweighted)
    out = {}
    for label, (a, b) in comparisons.items():
        d = paired_difference(results[a], results[b])
        out[label] = {**vars(d), "verdict": verdict(d)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", default="mnist1d")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dry-run", action="store_true", help="validate every run's config, train nothing")
    args = parser.parse_args()
    raw = yaml.safe_load((ROOT / "configs" / f"fisher_study_{args.testbed}.yaml").read_text())
    configs = run_configs(raw, args.seeds)
    for config in configs.values():
        build_config(config)
    if args.dry_run:
        print(f"{len(configs)} runs validated: {len(raw['arms'])} arms × {args.seeds} seeds")
        return
    measured_with = provenance()  # before the runs: the code they import is this commit's
    keys = list(configs)
    first = accuracy(configs[keys[0]])  # alone: it trains and caches the teacher the others share
    with ProcessPoolExecutor(args.workers) as pool:
        rest = list(pool.map(accuracy, [configs[k] for k in keys[1:]]))
    by_run = dict(zip(keys, [first, *rest]))
    results = {arm: [by_run[arm, s] for s in range(args.seeds)] for arm in raw["arms"]}
    comparisons = analyse(results)
    out = ROOT / "results" / f"fisher_study_{args.testbed}"
    out.mkdir(parents=True, exist_ok=True)
    table = {arm: {"mean": statistics.fmean(v), "std": statistics.stdev(v), "runs": v} for arm, v in results.items()}
    (out / "results.json").write_text(json.dumps(
        {**measured_with, "config": raw, "seeds": args.seeds, "accuracy": table, "comparisons": comparisons}, indent=2
    ))
    lines = ["| arm | test acc % (mean ± std) |", "|---|---|"]
    lines += [f"| {arm} | {v['mean']:.1f} ± {v['std']:.1f} |" for arm, v in table.items()]
    lines += ["", "| comparison (paired by seed) | mean difference [95% interval] | verdict |", "|---|---|---|"]
    lines += [f"| {label} | {c['mean']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}] | {c['verdict']} |"
              for label, c in comparisons.items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
