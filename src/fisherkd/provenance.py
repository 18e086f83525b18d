"""Where and with what a number was measured: every benchmark's JSON and every model card carries this."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import torch


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name, or ``cpu: <model name> (<threads> threads)``."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    return f"cpu: {model or platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def source_commit() -> str | None:
    """The git commit of the FisherKD source tree (with ``+dirty`` for uncommitted changes), or None outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def provenance(device: torch.device | str | None = None) -> dict[str, Any]:
    """Device, library versions and source commit, for a results file."""
    import fisherkd

    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "fisherkd": fisherkd.__version__,
        "commit": source_commit(),
    }
