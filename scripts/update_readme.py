"""Regenerate the README's generated blocks: python scripts/update_readme.py

- the method table, from the registry;
- each accuracy table, from ``benchmarks/results/<table>/results.md`` (what ``benchmarks/accuracy_tables.py``
  wrote), so the README shows the committed numbers and nothing else.
"""

import re
from pathlib import Path

from fisherkd.cli import methods_markdown
from fisherkd.methods import available, describe

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
START, END = "<!-- methods-table -->", "<!-- /methods-table -->"
RESULTS_BLOCK = re.compile(r"<!-- results: (\S+) -->\n.*?<!-- /results -->", re.S)


def generated_table() -> str:
    return methods_markdown([describe(name) for name in available()])


def results_table(table: str) -> str:
    """The committed table of ``benchmarks/results/<table>/results.md``, without its caption line."""
    lines = (ROOT / "benchmarks" / "results" / table / "results.md").read_text().strip().splitlines()
    return "\n".join(line for line in lines if line.startswith("|"))


def results_block(table: str) -> str:
    return f"<!-- results: {table} -->\n{results_table(table)}\n<!-- /results -->"


def main() -> None:
    text = README.read_text()
    block = f"{START}\n{generated_table()}\n{END}"
    text = re.sub(f"{re.escape(START)}.*?{re.escape(END)}", lambda _: block, text, flags=re.S)
    text = RESULTS_BLOCK.sub(lambda match: results_block(match.group(1)), text)
    README.write_text(text)


if __name__ == "__main__":
    main()
