"""Training engine: optimizer, schedule, AMP, accumulation, evaluation, checkpoints and exact resume.

The training loop is imported on first use, so that reading a checkpoint (``fisherkd.schemes``) does not pull in
the trainer, the data package and rich.
"""

from typing import Any

from fisherkd.engine.checkpoint import load_checkpoint, save_atomic

_TRAINER_NAMES = ("Trainer", "evaluate")


def __getattr__(name: str) -> Any:
    if name in _TRAINER_NAMES:
        from fisherkd.engine import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'fisherkd.engine' has no attribute {name!r}")


__all__ = ["Trainer", "evaluate", "load_checkpoint", "save_atomic"]
