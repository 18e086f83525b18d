"""Paired-by-seed comparisons of the rows of a ``fisherkd compare`` result (the study protocol).

    python benchmarks/paired.py RESULTS_DIR benchmarks/configs/paired/<name>.yaml

``fisherkd compare`` runs every row with the same seeds 0..n−1 and keeps each row's per-seed test accuracies; the
YAML lists the comparisons ``[[a, b], ...]`` fixed before the run. Each is reported as the mean of the per-seed
differences a − b with its 95% t interval (:mod:`fisherkd.stats`): "wins" when the interval lies above 0, "loses"
when below, else "ties". Writes ``paired.md`` and ``paired.json`` next to the results.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from fisherkd.stats import paired_difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="the folder of a fisherkd compare run (its results.json)")
    parser.add_argument("comparisons", type=Path, help="YAML with comparisons: [[a, b], ...]")
    args = parser.parse_args()
    result = json.loads((args.results / "results.json").read_text())
    rows = {row["variant"]: row["accuracies"] for row in result["rows"]}
    pairs = yaml.safe_load(args.comparisons.read_text())["comparisons"]
    missing = sorted({name for pair in pairs for name in pair} - set(rows))
    if missing:
        raise SystemExit(f"rows {missing} are not in {args.results}/results.json; rows: {sorted(rows)}")
    out = {}
    lines = ["| comparison (paired by seed) | mean difference [95% interval] | verdict |", "|---|---|---|"]
    for a, b in pairs:
        d = paired_difference(rows[a], rows[b])
        verdict = "wins" if d.low > 0 else "loses" if d.high < 0 else "ties"
        out[f"{a} − {b}"] = {"mean": d.mean, "low": d.low, "high": d.high, "pairs": d.n, "verdict": verdict}
        lines.append(f"| {a} − {b} | {d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}] | {verdict} |")
    where = {key: result[key] for key in ("device", "torch", "python", "fisherkd", "commit") if key in result}
    if "device" not in where:
        raise SystemExit(f"{args.results}/results.json does not say where it was measured (no 'device' field)")
    (args.results / "paired.json").write_text(json.dumps({**where, "comparisons": out}, indent=1))
    (args.results / "paired.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
