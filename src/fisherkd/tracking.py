"""Metrics to disk always (JSONL, CSV at close); to TensorBoard and Weights & Biases when asked."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from fisherkd.config import TrackingConfig


class Tracker:
    """Writes every logged row to ``metrics.jsonl`` at once (so a crash loses nothing) and a ``metrics.csv``
    with the union of the columns at ``close``."""

    def __init__(self, run_dir: str | Path, config: TrackingConfig | None = None, run_config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._file = open(self.path, "a")
        config = config or TrackingConfig()
        self._tensorboard = None
        self._wandb = None
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("tracking.tensorboard needs: pip install 'fisherkd[tensorboard]'") from None
            self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
        if config.wandb:
            try:
                import wandb
            except ImportError:
                raise ImportError("tracking.wandb needs wandb: pip install 'fisherkd[wandb]'") from None
            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(
                project=config.wandb_project,
                dir=str(self.run_dir),
                mode=config.wandb_mode,
                config=run_config or {},
                name=self.run_dir.name,
                reinit="finish_previous",
            )

    def log(self, step: int, values: dict[str, Any], split: str = "train") -> None:
        row = {"step": step, "split": split, **values}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for key, value in values.items():
            if isinstance(value, (int, float)) and self._tensorboard is not None:
                self._tensorboard.add_scalar(f"{split}/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"{split}/{k}": v for k, v in values.items()}, step=step)

    def truncate(self, last_step: int) -> list[dict[str, Any]]:
        """Drop rows after ``last_step`` (they belong to steps a resumed run will redo); return the rest."""
        self._file.close()
        rows = [r for r in read_metrics(self.path) if r["step"] <= last_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self._file = open(self.path, "a")
        return rows

    def close(self) -> None:
        self._file.close()
        rows = read_metrics(self.path)
        columns = list(dict.fromkeys(k for row in rows for k in row))
        with open(self.run_dir / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
