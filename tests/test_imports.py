"""Import structure: the method library stands alone, and no package imports back into the Distiller."""

import subprocess
import sys

import pytest


def modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_the_method_library_does_not_pull_in_the_engine_rich_or_transformers():
    loaded = modules_after("import fisherkd.methods; fisherkd.methods.available()")
    heavy = {"rich", "fisherkd.engine.trainer", "fisherkd.run", "fisherkd.data", "transformers", "matplotlib"}
    assert not heavy & loaded, f"importing fisherkd.methods loads {sorted(heavy & loaded)}"


@pytest.mark.parametrize("module", ["fisherkd.fisher.estimators", "fisherkd.fisher.weighter", "fisherkd.distiller"])
def test_each_layer_imports_first_in_a_fresh_interpreter(module):
    # an import cycle shows as an ImportError when the cycle is entered from its other end
    modules_after(f"import {module}")
