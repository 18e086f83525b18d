"""The documented recipes in configs/: each is a valid config that trains, here on tiny files in the real format."""

from pathlib import Path

import torch
import yaml

from fisherkd.config import build_config
from fisherkd.run import train
from test_data import write_cifar

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_cifar100_recipe_is_the_standard_schedule_and_trains(tmp_path, monkeypatch):
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path / "cache"))
    raw = yaml.safe_load((CONFIGS / "cifar100_resnet32x4_to_resnet8x4.yaml").read_text())
    config = build_config(raw)
    for recipe in (config.train, config.teacher.train):
        assert recipe.epochs == 240 and recipe.batch_size == 64
        assert (recipe.optimizer.name, recipe.optimizer.lr, recipe.optimizer.momentum) == ("sgd", 0.05, 0.9)
        assert recipe.optimizer.weight_decay == 5e-4
        schedule = recipe.schedule
        assert (schedule.name, schedule.milestones, schedule.gamma) == ("step", [150, 180, 210], 0.1)
        assert (recipe.augment.crop_padding, recipe.augment.flip) == (4, True)
    assert (config.teacher.name, config.student.name) == ("resnet32x4", "resnet8x4")
    assert [(m.name, m.weight) for m in config.methods] == [("ce", 0.1), ("kd", 0.9)]

    write_cifar(tmp_path, "cifar100", n=4)  # 4 images in each of the real files
    tiny = ["teacher.train.epochs=1", "train.epochs=1", "teacher.train.batch_size=2", "train.batch_size=2"]
    overrides = [f"data.root={tmp_path}", f"output_dir={tmp_path / 'runs'}", *tiny]
    summary = train(build_config(raw, overrides))
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["test_accuracy"]))
