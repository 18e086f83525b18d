"""Where FisherKD keeps generated data and trained teachers between runs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$FISHERKD_CACHE``, else ``~/.cache/fisherkd``; created on first use."""
    path = Path(os.environ.get("FISHERKD_CACHE", Path.home() / ".cache" / "fisherkd"))
    path.mkdir(parents=True, exist_ok=True)
    return path
