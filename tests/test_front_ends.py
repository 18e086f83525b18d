"""Every registered method, at its default settings, gives a non-zero, finite loss and gradient through both
front-ends: the engine's Trainer and the Hugging Face DistillationTrainer.

Both front-ends drive the same Distiller; what differs is how they build each step (epoch, indices, hooks). A
method with a warm-up multiplied by an epoch that a front-end never passes trains at zero loss without any error,
so the test runs two optimizer steps and looks at the last one: a warm-up has started by then, a missing epoch
keeps it at 0.

Nothing here names a method: what to feed each one comes from its class (``pair_kinds``, ``same_architecture``,
required hyper-parameters), so a new method is covered without touching this file.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from fisherkd.config import TrainConfig
from fisherkd.data import ArrayDataset, DataSplits
from fisherkd.distiller import Distiller
from fisherkd.engine.trainer import Trainer
from fisherkd.methods import available, describe, method_class
from fisherkd.schemes import add_dual_head
from helpers import TinyCNN

SAMPLES = 16
# Values for hyper-parameters that have no default because they describe the data, by name.
DATA_HYPERPARAMETERS = {"num_data": SAMPLES}

# A layer pair of each kind that the front-end's models offer (student tap, teacher tap).
ENGINE_PAIRS = {
    "map": ("block2", "block2"),
    "vector": ("pool", "pool"),
    "logits": ("head.distill", ""),  # the distillation head of a dual-head student against the teacher's output
}
HF_PAIRS = {
    "token": ("bert.encoder.layer.1", "bert.encoder.layer.3"),
    "vector": ("bert.pooler", "bert.pooler"),
    "attention": ("bert.encoder.layer.1.attention.self:1", "bert.encoder.layer.3.attention.self:1"),
}


def spec_for(name: str, offered: dict[str, tuple[str, str]]) -> dict | None:
    """The method at its defaults with one pair of every kind it takes that the front-end offers; None when it
    takes pairs and the front-end offers none of their kinds (the method does not apply there)."""
    cls = method_class(name)
    pairs = [list(offered[kind]) for kind in cls.pair_kinds if kind in offered][: cls.max_pairs]
    if cls.pair_kinds and not pairs:
        return None
    required = [k for k, v in describe(name)["defaults"].items() if v == "required"]
    unknown = [k for k in required if k not in DATA_HYPERPARAMETERS]
    assert not unknown, f"{name}: required hyper-parameters {unknown}: add a value to DATA_HYPERPARAMETERS"
    return {"name": name, "pairs": pairs, **{k: DATA_HYPERPARAMETERS[k] for k in required}}


class Recorder:
    """The loss terms at every forward of the distiller and the student's gradient norm at every optimizer step."""

    def __init__(self, distiller: Distiller) -> None:
        self.losses: list[dict[str, float]] = []
        self.gradients: list[float] = []
        self.student = distiller.student
        distiller.register_forward_hook(self._forward)

    def _forward(self, _module, _args, out) -> None:
        self.losses.append({k: v.detach().float().item() for k, v in out.losses.items()})

    def gradient(self, *_args, **_kwargs) -> None:
        grads = [p.grad.detach().float().norm() for p in self.student.parameters() if p.grad is not None]
        self.gradients.append(torch.stack(grads).norm().item() if grads else 0.0)

    def check(self, name: str) -> None:
        assert len(self.losses) >= 2 and len(self.gradients) >= 2, (name, self.losses, self.gradients)
        last = self.losses[-1]
        assert last, f"{name}: no loss terms"
        for term, value in last.items():
            assert math.isfinite(value) and value != 0.0, f"{name}: loss term {term!r} = {value} at the last step"
        assert math.isfinite(self.gradients[-1]) and self.gradients[-1] > 0, f"{name}: gradient {self.gradients}"


def test_every_method_applies_to_at_least_one_front_end():
    orphans = [n for n in available() if spec_for(n, ENGINE_PAIRS) is None and spec_for(n, HF_PAIRS) is None]
    assert not orphans, f"no front-end offers the pair kinds of {orphans}"


ENGINE_METHODS = [n for n in available() if spec_for(n, ENGINE_PAIRS) is not None]
HF_METHODS = [n for n in available() if spec_for(n, HF_PAIRS) is not None]


@pytest.mark.parametrize("name", ENGINE_METHODS)
def test_engine_front_end_gives_a_loss_and_gradient_at_default_settings(name):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(SAMPLES, 3, 8, 8, generator=g), torch.randint(0, 5, (SAMPLES,), generator=g)
    splits = DataSplits("tiny", ArrayDataset(x, y), ArrayDataset(x[:8], y[:8]), 5, (3, 8, 8))
    spec, cls = spec_for(name, ENGINE_PAIRS), method_class(name)
    teacher = TinyCNN(width=8)
    student = TinyCNN(width=8) if cls.same_architecture else TinyCNN(width=4)
    if "logits" in cls.pair_kinds:
        student = add_dual_head(student, "head")
    distiller = Distiller(student, teacher, [spec], example_input=x[:2])
    recorder = Recorder(distiller)
    config = TrainConfig(epochs=1, batch_size=8, optimizer={"name": "adamw", "lr": 1e-3})
    trainer = Trainer(distiller, splits, config, device="cpu")
    trainer.optimizer.register_step_pre_hook(recorder.gradient)
    trainer.fit()
    recorder.check(name)
    distiller.close()


@pytest.mark.parametrize("name", HF_METHODS)
def test_hf_front_end_gives_a_loss_and_gradient_at_default_settings(name, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    sys.path.insert(0, str(Path(__file__).parent / "hf"))
    from test_layers import tiny_bert
    from test_trainer import arguments, text_examples
    from transformers import TrainerCallback

    from fisherkd.hf import DistillationConfig, DistillationTrainer

    torch.manual_seed(0)
    # widths divisible by MiniLM's default 12 relation heads; examples carry their dataset index (CRD's bank)
    teacher = tiny_bert(layers=4, hidden=24)
    student = tiny_bert(layers=4, hidden=24) if method_class(name).same_architecture else tiny_bert(layers=2, hidden=12)
    examples = [{**example, "index": torch.tensor(i)} for i, example in enumerate(text_examples(8))]
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        distillation=DistillationConfig(methods=[spec_for(name, HF_PAIRS)]),
        args=arguments(tmp_path, max_steps=2, num_train_epochs=1, learning_rate=1e-3),
        train_dataset=examples,
    )
    recorder = Recorder(trainer.distiller)

    class GradientCallback(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            recorder.gradient()

    trainer.add_callback(GradientCallback())
    trainer.train()
    recorder.check(name)
    trainer.distiller.close()
