"""Name → constructor registry for the model zoo, with timm/torchvision fall-through."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from typing import Any

from torch import nn

from fisherkd.core import nearest

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_loaded = False


def register_model(name: str):
    """Decorator: ``@register_model("resnet8x4")`` on a function ``(in_channels, num_classes, **kw) -> Module``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = fn
        return fn

    return wrap


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        import fisherkd.models as pkg

        for info in pkgutil.iter_modules(pkg.__path__):
            if info.name != "registry":
                importlib.import_module(f"fisherkd.models.{info.name}")


def available_models() -> list[str]:
    _load()
    return sorted(_MODELS)


def create_model(name: str, in_channels: int = 3, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build a zoo model, or ``timm:NAME`` / ``torchvision:NAME`` when those libraries are installed."""
    _load()
    source, sep, external = name.partition(":")
    if sep:
        return _create_external(source, external, in_channels, num_classes, **kwargs)
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; {nearest(name, _MODELS)} (or timm:NAME, torchvision:NAME)")
    constructor = _MODELS[name]
    parameters = inspect.signature(constructor).parameters
    accepted = [k for k, p in parameters.items() if k not in ("in_channels", "num_classes") and p.kind != p.VAR_KEYWORD]
    forwards = any(p.kind == p.VAR_KEYWORD for p in parameters.values())  # passes the rest on: let it decide
    unknown = [k for k in kwargs if k not in accepted]
    if unknown and not forwards:
        valid = nearest(unknown[0], accepted) if accepted else "it takes none"
        raise TypeError(f"model {name!r} has no argument {unknown[0]!r} (in its kwargs); {valid}")
    return constructor(in_channels=in_channels, num_classes=num_classes, **kwargs)


def _create_external(source: str, name: str, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    if source == "timm":
        try:
            import timm
        except ImportError:
            raise ImportError("timm models need timm: pip install 'fisherkd[timm]'") from None
        return timm.create_model(name, pretrained=False, in_chans=in_channels, num_classes=num_classes, **kwargs)
    if source == "torchvision":
        try:
            import torchvision.models as tvm
        except ImportError:
            raise ImportError("torchvision models need torchvision: pip install torchvision") from None
        if in_channels != 3:
            raise ValueError(f"torchvision:{name} expects 3 input channels, got in_channels={in_channels}")
        return tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    raise KeyError(f"unknown model source {source!r}; use timm:NAME or torchvision:NAME")
