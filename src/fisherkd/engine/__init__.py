"""Training engine: optimizer, schedule, AMP, accumulation, evaluation, checkpoints and exact resume."""

from fisherkd.engine.checkpoint import load_checkpoint, save_atomic
from fisherkd.engine.trainer import Trainer, evaluate

__all__ = ["Trainer", "evaluate", "load_checkpoint", "save_atomic"]
