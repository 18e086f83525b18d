"""The README's promises: its Python quickstart runs, its method table is the registry's."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_python_quickstart_runs():
    code = re.search(r"## Python quickstart\s+```python\n(.*?)```", README, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README quickstart", "exec"), namespace)
    out = namespace["out"]
    assert set(out.losses) == {"ce", "kd", "fitnet"} and out.loss.isfinite()
    assert not any(m._forward_hooks for m in namespace["student"].modules())


def test_method_table_is_generated_from_the_registry():
    sys.path.insert(0, str(ROOT / "scripts"))
    from update_readme import END, START, generated_table

    block = README[README.index(START) + len(START) : README.index(END)].strip()
    assert block == generated_table(), "README method table is stale: run python scripts/update_readme.py"


def test_benchmark_tables_are_the_committed_results():
    sys.path.insert(0, str(ROOT / "scripts"))
    from update_readme import RESULTS_BLOCK, results_block

    blocks = list(RESULTS_BLOCK.finditer(README))
    assert blocks, "the README shows no accuracy table"
    for match in blocks:
        assert match.group(0) == results_block(match.group(1)), (
            f"README table {match.group(1)!r} differs from benchmarks/results: run python scripts/update_readme.py"
        )


def test_ci_runs_the_readme_test_command():
    assert "make test" in README and "make test" in (ROOT / ".ci" / "run").read_text()
