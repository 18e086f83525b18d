"""The few helpers every layer of FisherKD shares, with no dependency on any of them (no import cycles).

- :func:`nearest` — the "did you mean" phrase of every error about an unknown name.
- :func:`model_logits` — logits from whatever a model returns (tensor, Transformers ``ModelOutput``, tuple).
- :func:`call_model` — call a model on a tensor or on a Transformers batch dict.
- :data:`UNLABELLED` — the label (-100) of a training input without one.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn

Inputs = Tensor | Mapping[str, Tensor]

# The label of a training input that has none (a transfer input only the teacher labels): PyTorch's ignore_index.
UNLABELLED = -100


def nearest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """A short 'did you mean' phrase listing the closest valid names."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.4)
    shown = close or sorted(choices)[:8]
    label = "did you mean" if close else "valid names include"
    return f"{label}: {', '.join(shown)}"


def model_logits(output: Any) -> Tensor:
    """Logits from a model output: a tensor, a Transformers ``ModelOutput`` or a tuple whose first item they are."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """``model(**inputs)`` for a batch dict (Transformers), else ``model(inputs)``."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
