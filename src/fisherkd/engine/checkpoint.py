"""Atomic checkpoints (temporary file + rename) that resume a run exactly."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fisherkd.errors import CheckpointError


def save_atomic(obj: Any, path: str | Path) -> None:
    """Write with ``torch.save`` to a temporary file in the same directory, then rename over ``path``: a crash
    leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", keys: Sequence[str] = ()
) -> dict[str, Any]:
    """Load tensors and plain containers only: ``weights_only=True`` runs no code from the file.

    A file that cannot be read (truncated, corrupt, not written by ``torch.save``, holding Python objects), is not
    a dict, or lacks one of ``keys`` raises a one-line :class:`CheckpointError` naming it.
    """
    path = Path(path)
    if not path.exists():
        siblings = sorted(p.name for p in path.parent.glob("*.pt")) if path.parent.is_dir() else []
        there = f" ({path.parent} has {', '.join(siblings)})" if siblings else ""
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist{there}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory, not a file written by torch.save")
    try:
        with warnings.catch_warnings(record=True) as caught:  # a bad file's warnings would only add noise
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch.load fails on a bad file with any of a dozen types: all mean "unreadable"
        reason = " ".join(str(err).split()).split(". ")[0][:120] or type(err).__name__
        if found := re.search(r"Unsupported global: GLOBAL (\S+)", str(err)):
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds Python objects ({found[1]}), not only tensors, and checkpoints are "
                "loaded with weights_only=True (no code from the file runs): save a state dict (model.state_dict())"
            ) from err
        size = path.stat().st_size
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read ({reason}; {size} bytes): it is truncated or corrupt (was its "
            "run killed while writing?) or was not written by torch.save; use another checkpoint or train again"
        ) from err
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, not a FisherKD checkpoint")
    if missing := [k for k in keys if k not in state]:
        found = ", ".join(map(str, list(state)[:4])) + (", ..." if len(state) > 4 else "")
        raise CheckpointError(
            f"checkpoint {str(path)!r} has no {missing[0]!r} (its keys: {found or 'none'}): it is not a FisherKD "
            f"checkpoint of this kind (a bare state dict?); give one with {', '.join(map(repr, keys))}"
        )
    return state


def load_weights(
    module: nn.Module, state: Mapping[str, Any], path: str | Path, what: str, optional: tuple[str, ...] = ()
) -> None:
    """``module.load_state_dict(state)``, refusing weights of another model with one line that names the file and
    the first key or shape that differs. Keys of ``module`` starting with one of ``optional`` may be absent."""
    own = module.state_dict()
    for key, value in state.items():
        mine = own.get(key)
        if not (isinstance(mine, torch.Tensor) and isinstance(value, torch.Tensor)) or mine.numel() == 0:
            continue  # extra state, or a buffer sized by its first update (Fisher EMAs) that takes the file's shape
        if value.shape != mine.shape:
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not fit the {what}: {key!r} is {tuple(value.shape)} in the file but "
                f"{tuple(mine.shape)} in the model; it was saved from another model or config"
            )
    missing = [k for k in own if k not in state and not k.startswith(optional)]
    unexpected = [k for k in state if k not in own]
    differences = [f"{len(missing)} of its weights are missing from the file (e.g. {missing[:2]})"] if missing else []
    differences += [f"{len(unexpected)} in the file are unknown to it (e.g. {unexpected[:2]})"] if unexpected else []
    if differences:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit the {what}: {' and '.join(differences)}; it was saved from "
            "another model or config"
        )
    module.load_state_dict(state, strict=False)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
