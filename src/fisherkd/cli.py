"""The ``fisherkd`` command line: train, eval, methods, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fisherkd.config import ConfigError, load_config
from fisherkd.engine.distributed import is_main

console = Console()


def cmd_train(args: argparse.Namespace) -> None:
    from fisherkd.run import train

    config = load_config(args.config, args.overrides)
    summary = train(config, run_dir=args.resume, resume=bool(args.resume))
    if is_main():  # under torchrun, one summary
        console.print_json(json.dumps(summary))


def cmd_eval(args: argparse.Namespace) -> None:
    from fisherkd.run import evaluate_run

    console.print_json(json.dumps(evaluate_run(args.run_dir, args.checkpoint)))


def cmd_report(args: argparse.Namespace) -> None:
    from fisherkd.report import write_report

    out = write_report(args.run_dir, samples=args.samples, checkpoint=args.checkpoint)
    console.print(f"wrote {out / 'report.md'}")


def cmd_methods(args: argparse.Namespace) -> None:
    from fisherkd.methods import available, describe

    rows = [describe(name) for name in available(args.family)]
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return
    if args.markdown:
        print(methods_markdown(rows))
        return
    table = Table(title="FisherKD methods")
    for column in ("name", "family", "loss weight", "Fisher axes", "defaults", "paper"):
        table.add_column(column)
    for row in rows:
        defaults = ", ".join(f"{k}={v}" for k, v in row["defaults"].items())
        axes = ", ".join(row["fisher_axes"]) or "-"
        table.add_row(row["name"], row["family"], f"{row['default_weight']:g}", axes, defaults, row["paper"])
    console.print(table)


def methods_markdown(rows: list[dict]) -> str:
    """The README's method table, generated from the registry."""
    lines = ["| method | family | loss weight | Fisher axes | defaults | paper |", "|---|---|---|---|---|---|"]
    for row in rows:
        defaults = ", ".join(f"{k}={v}" for k, v in row["defaults"].items()) or "-"
        axes = ", ".join(row["fisher_axes"]) or "-"
        lines.append(
            f"| `{row['name']}` | {row['family']} | {row['default_weight']:g} | {axes} | {defaults} | {row['paper']} |"
        )
    return "\n".join(lines)


def cmd_compare(args: argparse.Namespace) -> None:
    import yaml

    from fisherkd.compare import run_compare

    path = Path(args.config)
    if not path.exists():
        raise ConfigError(f"compare file {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    output = Path(args.output) if args.output else Path("runs") / f"compare-{path.stem}"
    run_compare(raw, output, seeds=args.seeds, methods=methods, overrides=args.overrides, resume=args.resume)


def cmd_demo(args: argparse.Namespace) -> None:
    from fisherkd.demo import run_demo

    run_demo(output_dir=Path(args.output), seeds=args.seeds, overrides=args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fisherkd", description="Knowledge distillation with Fisher weighting.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a student from a YAML config")
    train.add_argument("config", help="YAML file")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5 methods.1.temperature=2")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the interrupted run in RUN_DIR exactly")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="evaluate a run's checkpoint on the test split")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--checkpoint", default="last", choices=["last", "best"])
    evaluate.set_defaults(func=cmd_eval)

    report = sub.add_parser("report", help="curves, CKA, attention-map IoU and error inheritance of a run")
    report.add_argument("run_dir")
    report.add_argument("--checkpoint", default="last", choices=["last", "best"])
    report.add_argument("--samples", type=int, default=256, help="test samples for CKA and attention maps")
    report.set_defaults(func=cmd_report)

    methods = sub.add_parser("methods", help="list the registered distillation methods")
    methods.add_argument("--json", action="store_true", help="machine-readable: name, family, defaults, paper")
    methods.add_argument("--markdown", action="store_true", help="the README's table")
    methods.add_argument("--family", help="only this family (logit, feature, relation, attention, ...)")
    methods.set_defaults(func=cmd_methods)

    compare = sub.add_parser("compare", help="one teacher, several recipes × seeds → table, CSV and plot")
    compare.add_argument("config", help="a run config, optionally with variants: and compare: blocks")
    compare.add_argument("overrides", nargs="*", help="key=value overrides of the base config")
    compare.add_argument("--methods", help="comma-separated method names, each compared with scratch")
    compare.add_argument("--seeds", type=int, default=3)
    compare.add_argument("--output", help="default: runs/compare-<config name>")
    compare.add_argument(
        "--resume", action="store_true", help="reuse the finished runs in --output and continue interrupted ones"
    )
    compare.set_defaults(func=cmd_compare)

    demo = sub.add_parser("demo", help="distil a 1-D CNN into an MLP on MNIST-1D and compare methods")
    demo.add_argument("--output", default="runs/demo", help="where the runs, table and plots go")
    demo.add_argument("--seeds", type=int, default=2)
    demo.add_argument("overrides", nargs="*", help="key=value overrides of the demo config")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, KeyError, FileNotFoundError, ValueError, TypeError, ImportError) as err:
        if os.environ.get("FISHERKD_DEBUG"):
            raise
        message = err.args[0] if err.args else str(err)
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
