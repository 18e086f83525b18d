"""Model zoo: ``create_model(name, in_channels=3, num_classes=10, **kwargs)``; ``available_models()``.

Every zoo model exposes ``features`` (the penultimate representation, tappable by that name) and ``head``
(the final ``nn.Linear``), so penultimate-layer hints and closed-form Fisher weights work the same everywhere.
timm and torchvision models are available as ``timm:NAME`` and ``torchvision:NAME`` when installed.
``load_student(DIR)`` rebuilds a student written by ``fisherkd export``.
"""

from fisherkd.models.registry import available_models, create_model, register_model
from fisherkd.models.saved import load_student

__all__ = ["available_models", "create_model", "load_student", "register_model"]
