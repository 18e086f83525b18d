"""Registered distillation methods: ``create(name, **hparams)``, ``available()``, ``describe(name)``."""

from fisherkd.methods.base import (
    Hyperparameters,
    Method,
    MethodInputs,
    available,
    create,
    describe,
    method_class,
    register,
)

__all__ = [
    "Hyperparameters",
    "Method",
    "MethodInputs",
    "available",
    "create",
    "describe",
    "method_class",
    "register",
]
