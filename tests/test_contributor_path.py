"""The README's contributor path: a method written in three places (function, class, test) is seen everywhere.

This file plays the contributor: it writes a function and a registered class (here, for the test's sake, in one
file) that reads a per-step input no method read before (the optimizer step and a batch column), and checks that
the registry, the config, the CLI's method list and the engine find and train it with nothing else changed.
"""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import Field
from torch import Tensor

from fisherkd.cli import main
from fisherkd.config import ConfigError, RunConfig
from fisherkd.distiller import Distiller
from fisherkd.methods import Hyperparameters, Method, MethodInputs, describe, register
from fisherkd.methods.base import _REGISTRY
from helpers import TinyCNN, tiny_image_batch


def decayed_margin(student: Tensor, teacher: Tensor, step: Tensor, half_life: float) -> Tensor:
    """A toy loss: mean squared logit difference, halved every ``half_life`` optimizer steps."""
    return (student.float() - teacher.float()).pow(2).mean() * 0.5 ** (step.float() / half_life)


@pytest.fixture
def toy_method():
    @register("toy_decayed_margin")
    class ToyDecayedMargin(Method):
        """Toy: the squared logit margin, decaying with the optimizer step."""

        pair_kinds = ()

        class Params(Hyperparameters):
            half_life: float = Field(10.0, gt=0)

        def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
            assert inputs.batch is not None  # the whole input the models saw reaches every method
            loss = decayed_margin(inputs.student_logits, inputs.teacher_logits, inputs.step, self.hparams.half_life)
            return {"toy_decayed_margin": loss}

    yield ToyDecayedMargin
    del _REGISTRY["toy_decayed_margin"]


def test_a_new_method_is_found_everywhere_without_other_changes(toy_method, capsys):
    assert describe("toy_decayed_margin")["defaults"] == {"half_life": 10.0}
    assert main(["methods", "--json"]) == 0
    assert "toy_decayed_margin" in {row["name"] for row in json.loads(capsys.readouterr().out)}
    config = {"name": "toy", "data": {"name": "mnist1d"}, "teacher": {"name": "cnn1d"}, "student": {"name": "mlp"}}
    RunConfig.model_validate({**config, "methods": [{"name": "toy_decayed_margin", "half_life": 4}]})
    with pytest.raises((ConfigError, ValueError, TypeError), match="half_lif"):
        RunConfig.model_validate({**config, "methods": [{"name": "toy_decayed_margin", "half_lif": 4}]})


def test_a_new_per_step_input_comes_from_the_clock(toy_method):
    x, y = tiny_image_batch()
    distiller = Distiller(TinyCNN(4), TinyCNN(8), [{"name": "toy_decayed_margin", "half_life": 1.0}])
    distiller.clock.configure(steps_per_epoch=10)
    first = distiller(x, y).loss.detach()
    distiller.after_optimizer_step()
    distiller.after_optimizer_step()
    later = distiller(x, y).loss.detach()
    torch.testing.assert_close(later, first / 4)  # two steps at a half-life of one step
