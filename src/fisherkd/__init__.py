"""FisherKD: knowledge distillation for PyTorch with Fisher-information weighting."""

from fisherkd import functional, methods
from fisherkd.distiller import Distiller, DistillOutput, MethodSpec
from fisherkd.methods import available, create, register
from fisherkd.taps import Taps

__version__ = "0.1.0"

__all__ = [
    "DistillOutput",
    "Distiller",
    "MethodSpec",
    "Taps",
    "available",
    "create",
    "functional",
    "methods",
    "register",
]
