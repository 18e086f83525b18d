"""Regenerate the README's method table from the registry: python scripts/update_readme.py"""

import re
from pathlib import Path

from fisherkd.cli import methods_markdown
from fisherkd.methods import available, describe

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- methods-table -->", "<!-- /methods-table -->"


def generated_table() -> str:
    return methods_markdown([describe(name) for name in available()])


def main() -> None:
    text = README.read_text()
    block = f"{START}\n{generated_table()}\n{END}"
    README.write_text(re.sub(f"{re.escape(START)}.*?{re.escape(END)}", lambda _: block, text, flags=re.S))


if __name__ == "__main__":
    main()
