"""Capture intermediate tensors of any ``nn.Module`` by module name, with forward hooks.

A tap name is a module name as in ``model.named_modules()`` (``"layer3.2.conv2"``), optionally followed by
``:k`` to select element k of a tuple output (Transformers layers return tuples; ``"...self:1"`` is the
attention map of a BERT self-attention module called with ``output_attentions=True``), or by ``:in`` to take
the module's first input instead of its output (``"head:in"`` is the penultimate feature of a zoo model).
The empty name ``""`` is the model itself: its output (a teacher's logits, e.g. for the ``dual_head`` method).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from torch import Tensor, nn

from fisherkd.core import nearest

INPUT = -1  # the index that stands for a module's input (":in")


def parse_tap(name: str) -> tuple[str, int | None]:
    module, sep, index = name.partition(":")
    if not sep:
        return module, None
    if index == "in":
        return module, INPUT
    if not index.isdigit():
        raise ValueError(f"tap {name!r}: after ':' put an output index such as ':1', or 'in' for the module input")
    return module, int(index)


def _first_tensor(output: object, index: int | None, tap: str) -> Tensor:
    if index is not None:
        if not isinstance(output, (tuple, list)) or index >= len(output):
            raise ValueError(f"tap {tap!r}: module output has no element {index} (got {type(output).__name__})")
        output = output[index]
    elif isinstance(output, (tuple, list)):
        output = output[0]
    if hasattr(output, "last_hidden_state"):  # a Transformers ModelOutput
        output = output.last_hidden_state
    if output is None:
        raise ValueError(
            f"tap {tap!r}: the module returned None there; for attention maps of Transformers models, build them "
            "with attn_implementation='eager'"
        )
    if not isinstance(output, Tensor):
        raise ValueError(f"tap {tap!r}: module output is {type(output).__name__}, not a tensor; select one with ':k'")
    return output


class Taps:
    """Forward hooks on named submodules; ``taps[name]`` is the latest output of that module.

    Use as a context manager or call ``close()`` to remove the hooks.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], role: str = "model") -> None:
        self.names = list(dict.fromkeys(names))
        self.outputs: dict[str, Tensor] = {}
        self.active = True
        self._handles: list = []
        modules = dict(model.named_modules())
        for tap in self.names:
            module_name, index = parse_tap(tap)
            if module_name not in modules:
                choices = [n for n in modules if n]
                raise KeyError(f"{role} has no module {module_name!r}; {nearest(module_name, choices)}")
            self._handles.append(modules[module_name].register_forward_hook(self._hook(tap, index)))

    def _hook(self, tap: str, index: int | None):
        def hook(_module: nn.Module, inputs: tuple, output: object) -> None:
            if not self.active:
                return
            if index == INPUT:
                self.outputs[tap] = _first_tensor(inputs, 0, tap)
            else:
                self.outputs[tap] = _first_tensor(output, index, tap)

        return hook

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.outputs:
            raise RuntimeError(f"tap {name!r} captured nothing: its module did not run in the last forward pass")
        return self.outputs[name]

    def clear(self) -> None:
        self.outputs.clear()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Capture nothing inside the block: an extra forward pass (a Fisher estimate) keeps the outputs of the
        main pass in place."""
        self.active = False
        try:
            yield
        finally:
            self.active = True

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.outputs.clear()

    def __enter__(self) -> Taps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
