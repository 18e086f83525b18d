"""Accuracy tables: every applicable method on one teacher/student pair, ≥ 3 seeds, one budget for all.

    python benchmarks/accuracy_tables.py mnist1d [--seeds 3]

Runs ``fisherkd compare`` on ``benchmarks/configs/<table>.yaml`` and writes its results, with the device and
library versions, to ``benchmarks/results/<table>/``. The runs themselves go to ``runs/tables/``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
from pathlib import Path

import torch
import yaml

from fisherkd.compare import run_compare
from fisherkd.methods import available, method_class

ROOT = Path(__file__).resolve().parent
TABLES = {"mnist1d": "mnist1d_cnn1d_to_mlp.yaml"}
# Methods an MLP student cannot take: they need spatial maps, several stages, tokens or attention maps.
NOT_FOR_VECTORS = {"at", "reviewkd", "relation", "tinybert", "minilm", "fisher_param"}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"cpu: {model} ({torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=sorted(TABLES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", help="comma-separated; default: every applicable registered method")
    args = parser.parse_args()
    raw = yaml.safe_load((ROOT / "configs" / TABLES[args.table]).read_text())
    methods = args.methods.split(",") if args.methods else [
        m for m in available() if m not in NOT_FOR_VECTORS and method_class(m).family not in ("label", "scheme")
    ]
    out = ROOT / "results" / args.table
    work = Path("runs") / "tables" / args.table
    shutil.rmtree(work, ignore_errors=True)
    result = run_compare(raw, work, seeds=args.seeds, methods=methods)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("results.md", "results.csv", "comparison.png"):
        shutil.copy(work / name, out / name)
    result |= {
        "device": device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "config": raw,
        "budget": f"teacher {raw['teacher']['train']['epochs']} epochs, students {raw['train']['epochs']} epochs",
    }
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
