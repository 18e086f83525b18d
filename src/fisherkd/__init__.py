"""FisherKD: knowledge distillation for PyTorch with Fisher-information weighting."""

from fisherkd import fisher, functional, methods
from fisherkd.distiller import Distiller, DistillOutput, MethodSpec
from fisherkd.fisher import FisherSpec
from fisherkd.methods import available, create, register
from fisherkd.schemes import DualHead, EMATeacher, EnsembleTeacher, add_dual_head, load_student_weights
from fisherkd.taps import Taps

__version__ = "0.1.0"

__all__ = [
    "DistillOutput",
    "Distiller",
    "DualHead",
    "EMATeacher",
    "EnsembleTeacher",
    "FisherSpec",
    "MethodSpec",
    "Taps",
    "add_dual_head",
    "available",
    "create",
    "fisher",
    "functional",
    "load_student_weights",
    "methods",
    "register",
]
