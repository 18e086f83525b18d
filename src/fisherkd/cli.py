"""The ``fisherkd`` command line: train, eval, methods, demo, export, refine-data, search-student."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

import yaml
from rich.console import Console
from rich.table import Table

from fisherkd.config import load_config, read_yaml
from fisherkd.engine.distributed import is_main
from fisherkd.errors import UserError

console = Console()


def cmd_train(args: argparse.Namespace) -> None:
    from fisherkd.run import train

    config = load_config(args.config, args.overrides)
    if args.resume and not (Path(args.resume) / "checkpoints" / "last.pt").is_file():
        raise UserError(  # checked before train() writes the new config.yaml into that directory
            f"--resume {args.resume!r}: no checkpoints/last.pt there, so nothing to continue; give the directory of "
            "an interrupted run (output_dir/name)"
        )
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
    from fisherkd.core import nearest
    from fisherkd.methods import available, describe

    families = {describe(name)["family"] for name in available()}
    if args.family is not None and args.family not in families:
        raise KeyError(f"unknown method family {args.family!r}; {nearest(args.family, families)}")
    rows = [describe(name) for name in available(args.family)]
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return
    if args.markdown:
        print(methods_markdown(rows))
        return
    table = Table(title="FisherKD methods")
    for column in ("name", "family", "layer pairs", "loss weight", "Fisher axes", "defaults", "paper"):
        table.add_column(column)
    for row in rows:
        defaults = ", ".join(f"{k}={v}" for k, v in row["defaults"].items())
        axes, pairs = ", ".join(row["fisher_axes"]) or "-", ", ".join(row["pairs"]) or "-"
        table.add_row(row["name"], row["family"], pairs, f"{row['default_weight']:g}", axes, defaults, row["paper"])
    console.print(table)


def methods_markdown(rows: list[dict]) -> str:
    """The README's method table, generated from the registry."""
    lines = [
        "| method | family | layer pairs | loss weight | Fisher axes | defaults | paper |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        defaults = ", ".join(f"{k}={v}" for k, v in row["defaults"].items()) or "-"
        axes = ", ".join(row["fisher_axes"]) or "-"
        pairs = ", ".join(row["pairs"]) or "-"
        lines.append(
            f"| `{row['name']}` | {row['family']} | {pairs} | {row['default_weight']:g} | {axes} | {defaults} "
            f"| {row['paper']} |"
        )
    return "\n".join(lines)


def cmd_compare(args: argparse.Namespace) -> None:
    from fisherkd.compare import run_compare

    path = Path(args.config)
    raw = read_yaml(path, "compare file")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    output = Path(args.output) if args.output else Path("runs") / f"compare-{path.stem}"
    run_compare(raw, output, seeds=args.seeds, methods=methods, overrides=args.overrides, resume=args.resume)


def cmd_demo(args: argparse.Namespace) -> None:
    from fisherkd.demo import run_demo

    run_demo(output_dir=Path(args.output), seeds=args.seeds, overrides=args.overrides)


def cmd_export(args: argparse.Namespace) -> None:
    from fisherkd.export import export_run

    manifest = export_run(args.run_dir, args.output, args.format, args.checkpoint, args.device)
    checked = ", ".join(f"{k} {100 * v['test_accuracy']:.2f}%" for k, v in manifest["verification"].items())
    files = ", ".join(manifest["files"].values())
    lines = [
        f"exported {manifest['run_dir']} ({args.checkpoint}.pt) to {manifest['output']}: {files}",
        f"verified (test accuracy): {checked}; model card {manifest['output']}/README.md",
        *(f"[yellow]not exported: {fmt} ({why})[/yellow]" for fmt, why in manifest["skipped"].items()),
    ]
    if manifest["missing_teacher"]:
        lines.append(f"[yellow]no teacher metrics or timing: {manifest['missing_teacher']}[/yellow]")
    for line in lines:
        console.print(line, soft_wrap=True)  # no wrapping: paths stay whole, to be copied


def cmd_refine_data(args: argparse.Namespace) -> None:
    import rich.progress as rp
    import torch

    from fisherkd.hf.refine import load_causal_lm, read_corpus, refine_corpus

    if not 0 < args.keep_ratio <= 1:  # checked before the models load
        raise UserError(f"--keep-ratio must be in (0, 1] (the fraction of documents kept), got {args.keep_ratio}")
    texts = read_corpus(args.corpus)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    teacher, tokenizer = load_causal_lm(args.teacher, "--teacher")
    reference, reference_tokenizer = load_causal_lm(args.reference, "--reference")
    columns = (rp.TextColumn("[bold]{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn())
    columns += (rp.TimeElapsedColumn(), rp.TimeRemainingColumn(), rp.TextColumn("{task.fields[info]}"))
    with rp.Progress(*columns, console=console) as progress:
        report = refine_corpus(
            teacher.to(device),
            reference.to(device),
            tokenizer,
            texts,
            args.keep_ratio,
            args.output,
            reference_tokenizer=reference_tokenizer,
            batch_size=args.batch_size,
            max_length=args.max_length,
            progress=progress,
        )
    console.print(
        f"kept {report['kept']} of {report['documents']} documents in {Path(args.output) / 'refined.jsonl'}; "
        f"report {Path(args.output) / 'report.md'}",
        soft_wrap=True,
    )


def cmd_search_student(args: argparse.Namespace) -> None:
    from fisherkd.search import make_space, run_search

    config = load_config(args.config, args.overrides)
    specs: list = [name.strip() for name in args.space.split(",") if name.strip()] if args.space else []
    if args.space_file:
        raw = read_yaml(args.space_file, "search space file")
        specs += raw["spaces"] if isinstance(raw.get("spaces"), list) else [raw]
    if not specs:
        family = config.student.name or ""
        if family not in ("mlp", "cnn1d") and not family.startswith("resnet"):
            raise UserError(f"the config's student {family!r} has no search space: give --space mlp, cnn1d or resnet")
        specs = ["resnet:" + family if family.startswith("resnet") else family]
    spaces = [make_space(spec) for spec in specs]
    output = Path(args.output) if args.output else Path("runs") / f"search-{Path(args.config).stem}"
    run_search(config, spaces, output, args.population, args.generations, args.budget, args.batches,
               args.batch_size, args.seed, args.inits, console=console)


class Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake raised as a :class:`UserError` so that it prints in one line like the rest."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fisherkd", description="Knowledge distillation with Fisher weighting.")
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
    report.add_argument("--samples", type=positive_int, default=256, help="test samples for CKA and attention maps")
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
    compare.add_argument("--seeds", type=positive_int, default=3)
    compare.add_argument("--output", help="default: runs/compare-<config name>")
    compare.add_argument(
        "--resume", action="store_true", help="reuse the finished runs in --output and continue interrupted ones"
    )
    compare.set_defaults(func=cmd_compare)

    demo = sub.add_parser("demo", help="distil a 1-D CNN into an MLP on MNIST-1D and compare methods")
    demo.add_argument("--output", default="runs/demo", help="where the runs, table and plots go")
    demo.add_argument("--seeds", type=positive_int, default=2)
    demo.add_argument("overrides", nargs="*", help="key=value overrides of the demo config")
    demo.set_defaults(func=cmd_demo)

    export = sub.add_parser("export", help="the student alone as safetensors/ONNX/TorchScript, verified, with a card")
    export.add_argument("run_dir", help="a run, or a demo/compare output folder (then its most accurate run)")
    export.add_argument(
        "--checkpoint", default="last", choices=["last", "best"], help="default last; best.pt is chosen on test data"
    )
    export.add_argument(
        "--format", default="safetensors,onnx,torchscript", help="comma-separated subset of the default (all three)"
    )
    export.add_argument("--output", help="default: RUN_DIR/export")
    export.add_argument("--device", default="auto", help="where teacher and student are timed for the card")
    export.set_defaults(func=cmd_export)

    refine = sub.add_parser(
        "refine-data", help="keep the documents a teacher finds likelier than a reference model (MiniPLM)"
    )
    refine.add_argument("--teacher", required=True, help="a local Hugging Face model folder or a .gguf file")
    refine.add_argument("--reference", required=True, help="the small reference model: folder or .gguf")
    refine.add_argument("--corpus", required=True, help="a JSONL file with a 'text' field, or a folder of .txt files")
    refine.add_argument("--keep-ratio", type=float, required=True, help="fraction of documents kept, in (0, 1]")
    refine.add_argument("--output", required=True, help="folder for refined.jsonl, the report and the resumable scores")
    refine.add_argument("--batch-size", type=positive_int, default=8)
    refine.add_argument("--max-length", type=positive_int, default=1024, help="longer documents are chunked")
    refine.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    refine.set_defaults(func=cmd_refine_data)
    search = sub.add_parser(
        "search-student", help="DisWOT: rank candidate students for a config's teacher without training them"
    )
    search.add_argument("config", help="a run config: its teacher (cached, or trained once) and data")
    search.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    search.add_argument("--space", help="families, comma-separated: mlp, cnn1d, resnet, resnet:resnet8x4 (default: "
                        "the config student's family)")
    search.add_argument("--space-file", help="YAML: {family: mlp, depths: [...], widths: [...]} or spaces: [...]")
    search.add_argument("--population", type=positive_int, default=16)
    search.add_argument("--generations", type=int, default=10, help="0: score the first population only")
    search.add_argument("--budget", type=positive_int, help="keep only students with at most this many parameters")
    search.add_argument("--batches", type=positive_int, default=3, help="training batches each student is scored on")
    search.add_argument("--batch-size", type=positive_int, default=64)
    search.add_argument("--inits", type=positive_int, default=1, help="random inits each student's score averages")
    search.add_argument("--seed", type=int, default=0, help="seeds sampling, mutation, batches and student inits")
    search.add_argument("--output", help="default: runs/search-<config name>")
    search.set_defaults(func=cmd_search_student)
    return parser


# Errors about the input (files, names, options, data, checkpoints) print as their message alone.
INPUT_ERRORS = (UserError, ValueError, TypeError, KeyError, OSError, ImportError, RuntimeError, yaml.YAMLError)


def error_line(err: Exception) -> str:
    """``err`` in one line: its message (a KeyError's without quotes) with whitespace collapsed, else its type; an
    error that is not about the input (a bug) also names its type and how to get the traceback."""
    text = err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
    text = " ".join(text.split()) or type(err).__name__
    text = text if len(text) <= 600 else text[:600] + " ..."
    if isinstance(err, INPUT_ERRORS):
        return text
    return f"{text} ({type(err).__name__}, an internal error: FISHERKD_DEBUG=1 shows the traceback for a bug report)"


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every error ends as one line on stderr, ``error: ...``, and exit status 2;
    ``FISHERKD_DEBUG=1`` re-raises it with its traceback."""
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except Exception as err:  # the CLI's boundary: a traceback is for FISHERKD_DEBUG=1 only
        if os.environ.get("FISHERKD_DEBUG"):
            raise
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
