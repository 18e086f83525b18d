"""Accuracy tables: every applicable method on one teacher/student pair, ≥ 3 seeds, one budget for all.

    python benchmarks/accuracy_tables.py {mnist1d,mnist1d_augmentation,fmnist_cnn,fmnist_mlp} [--seeds 3]

Runs ``fisherkd compare`` on ``benchmarks/configs/<table>.yaml`` (every applicable method, then the file's
Fisher-weighted variants) and writes its results, with the device and library versions, to
``benchmarks/results/<table>/``. The runs themselves go to ``runs/tables/``; a stopped table goes on where it
stopped (``--fresh`` starts it again).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

from fisherkd.compare import run_compare
from fisherkd.methods import available, method_class

ROOT = Path(__file__).resolve().parent


def takes_none_of(kinds: set[str]) -> set[str]:
    """Methods whose layer pairs must be of other kinds (from each class's ``pair_kinds``)."""
    return {m for m in available() if method_class(m).pair_kinds and not kinds & set(method_class(m).pair_kinds)}


# Methods an MLP student cannot take: they need spatial maps, tokens or attention maps.
NOT_FOR_VECTORS = takes_none_of({"vector"})
# Methods a CNN cannot take (attention maps, tokens).
NOT_FOR_CNNS = takes_none_of({"map", "vector"})
# Parameter penalties (fisher_param) pull each student parameter to the teacher's of the same name and shape: for a
# pruned or teacher-initialised copy of the teacher, which none of these students is.
ONLY_FOR_COPIES = {m for m in available() if method_class(m).same_architecture}
TABLES = {  # table -> (config in benchmarks/configs, methods left out; None: the config's variants only)
    "mnist1d": ("mnist1d_cnn1d_to_mlp.yaml", NOT_FOR_VECTORS | ONLY_FOR_COPIES),
    "fmnist_cnn": ("fmnist_resnet8_to_cnn_small.yaml", NOT_FOR_CNNS | ONLY_FOR_COPIES),
    "fmnist_mlp": ("fmnist_resnet8_to_mlp.yaml", NOT_FOR_VECTORS | ONLY_FOR_COPIES),
    "mnist1d_augmentation": ("mnist1d_augmentation.yaml", None),  # its variants only
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=sorted(TABLES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", help="comma-separated; default: every applicable registered method")
    parser.add_argument("--fresh", action="store_true", help="discard the runs of an earlier attempt")
    parser.add_argument("--no-variants", action="store_true", help="only the method rows (to split a table)")
    args = parser.parse_args()
    config_file, left_out = TABLES[args.table]
    raw = yaml.safe_load((ROOT / "configs" / config_file).read_text())
    if args.no_variants:
        raw.pop("variants", None)
    # ce is every table's scratch row; schemes need a student or teacher of their own, so they are the config's
    # variants (dual_head, ensembles)
    if args.methods:
        methods = args.methods.split(",")
    elif left_out is not None:
        methods = [m for m in available() if m not in left_out and method_class(m).family not in ("label", "scheme")]
    else:
        methods = None
    out = ROOT / "results" / args.table
    work = Path("runs") / "tables" / args.table
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    result = run_compare(raw, work, seeds=args.seeds, methods=methods, resume=True)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("results.md", "results.csv", "comparison.png"):
        shutil.copy(work / name, out / name)
    result |= {  # run_compare's result already says where it was measured
        "config": raw,
        "budget": f"teacher {raw['teacher']['train']['epochs']} epochs, students {raw['train']['epochs']} epochs",
    }
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
