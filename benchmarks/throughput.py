"""Training throughput (images/s) of FisherKD's engine against a floor and a ceiling, all in one process.

For each method (and its Fisher-weighted variant) at each batch size:

- **ours**: :class:`fisherkd.engine.Trainer` end to end: batches drawn from the device-resident dataset, random
  crop and flip on the device, the Distiller's step (teacher inference, student forward and backward, every
  loss, Fisher weights), the optimizer with its schedule, metrics summed on the device. Evaluation excluded.
- **floor**: the plain eager step a KD user writes first: teacher inference under ``no_grad``, student forward,
  cross-entropy, backward, optimizer step, on one fixed batch (no data pipeline, no distillation loss).
- **ceiling** (CUDA only): the same Distiller step as ours, on one fixed batch, captured whole in a CUDA graph
  (forward, backward, fused SGD with a device learning rate) and replayed: what the hardware allows with no
  launches and no data pipeline.

Ratios ours/floor and ours/ceiling come from the same process and device. On CUDA every mode runs under bf16
autocast with channels_last, as the engine does by default. Defaults: CIFAR-100-shaped random data (speed does not
depend on the pixels), resnet32x4 → resnet8x4, batches 64 and 256 (the issue's setting). On a CPU the ceiling is
not measured, and ``--teacher resnet8x4 --student resnet8`` keeps a run to a few minutes.

    python benchmarks/throughput.py [--batch-sizes 64 256] [--methods kd,dkd] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import Progress

from fisherkd.config import TrainConfig
from fisherkd.data import ArrayDataset, DataSplits
from fisherkd.distiller import Distiller
from fisherkd.engine import Trainer
from fisherkd.engine.trainer import autocast, make_optimizer
from fisherkd.models import create_model
from fisherkd.provenance import provenance

RESULTS = Path(__file__).parent / "results"
LAST_STAGE = [["layer3", "layer3"]]
ALL_STAGES = [["layer1", "layer1"], ["layer2", "layer2"], ["layer3", "layer3"]]
# method label -> the distillation entry next to ce (weight 0.1 for logit methods, 1 otherwise: compare's recipes)
METHODS: dict[str, dict[str, Any]] = {
    "kd": {"name": "kd"},
    "dkd": {"name": "dkd"},
    "dist": {"name": "dist"},
    "fitnet": {"name": "fitnet", "pairs": LAST_STAGE},
    "at": {"name": "at", "pairs": ALL_STAGES},
    "crd": {"name": "crd", "pairs": [["head:in", "head:in"]]},
}
FISHER: dict[str, dict[str, Any]] = {  # the Fisher-weighted variant of each method, at the defaults of fisher:
    "kd": {"axis": "sample"},
    "dkd": {"axis": "sample"},
    "fitnet": {"axis": "channel"},
    "crd": {"axis": "sample"},
}
FISHER_PER_PAIR = {"at": {"axis": "channel"}}  # channel weights belong to one layer: one entry per pair
NUM_DATA = 50_000  # CIFAR-100's training set: CRD's memory bank has one row per sample


def method_specs(label: str, fisher: bool) -> list[dict[str, Any]]:
    base = dict(METHODS[label])
    label_weight = 0.1 if label in ("kd", "dkd") else 1.0
    if base["name"] == "crd":
        base["num_data"] = NUM_DATA
    if not fisher:
        return [{"name": "ce", "weight": label_weight}, base]
    if label in FISHER_PER_PAIR:
        entries = [{**base, "pairs": [pair], "fisher": FISHER_PER_PAIR[label]} for pair in base["pairs"]]
        return [{"name": "ce", "weight": label_weight}, *entries]
    return [{"name": "ce", "weight": label_weight}, {**base, "fisher": FISHER[label]}]


def variants(methods: list[str]) -> list[tuple[str, list[dict[str, Any]]]]:
    rows = []
    for label in methods:
        rows.append((label, method_specs(label, fisher=False)))
        if label in FISHER or label in FISHER_PER_PAIR:
            rows.append((f"{label} + Fisher", method_specs(label, fisher=True)))
    return rows


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(run: Any, steps: int, batch: int, device: torch.device, repeats: int) -> float:
    """Median images/s over ``repeats`` timings of ``run(steps)``."""
    rates = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run(steps)
        synchronize(device)
        rates.append(steps * batch / (time.perf_counter() - start))
    return statistics.median(rates)


def build(args: argparse.Namespace, specs: list[dict[str, Any]], device: torch.device) -> Distiller:
    torch.manual_seed(0)
    teacher, student = create_model(args.teacher, 3, 100), create_model(args.student, 3, 100)
    example = torch.randn(2, 3, 32, 32, device=device)
    return Distiller(student.to(device), teacher.to(device), specs, example_input=example)


def train_config(batch: int) -> TrainConfig:
    return TrainConfig(
        epochs=1,
        batch_size=batch,
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        augment={"crop_padding": 4, "flip": True},
        log_every=50,
    )


def measure_ours(args, specs, batch: int, device: torch.device) -> float:
    steps = args.warmup + args.steps * args.repeats
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch * (steps + 1), 3, 32, 32, generator=generator)
    y = torch.randint(0, 100, (len(x),), generator=generator)
    splits = DataSplits("cifar100-shaped", ArrayDataset(x, y), ArrayDataset(x[:batch], y[:batch]), 100, (3, 32, 32))
    quiet = Progress(disable=True)
    trainer = Trainer(build(args, specs, device), splits, train_config(batch), device=device, progress=quiet)
    trainer.fit(stop_after_steps=args.warmup)  # fit resumes from trainer.step: each call runs `steps` more

    def run(n: int) -> None:
        trainer.fit(stop_after_steps=trainer.step + n)

    return timed(run, args.steps, batch, device, args.repeats)


def fixed_batch(batch: int, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=generator).to(device)
    y = torch.randint(0, 100, (batch,), generator=generator).to(device)
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y


def measure_floor(args, batch: int, device: torch.device) -> float:
    torch.manual_seed(0)
    teacher = create_model(args.teacher, 3, 100).to(device).eval().requires_grad_(False)
    student = create_model(args.student, 3, 100).to(device).train()
    cuda = device.type == "cuda"
    if cuda:
        teacher, student = teacher.to(memory_format=torch.channels_last), student.to(memory_format=torch.channels_last)
    x, y = fixed_batch(batch, device, cuda)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def run(n: int) -> None:
        for _ in range(n):
            with autocast(device, "auto"):
                with torch.no_grad():
                    teacher(x)
                loss = F.cross_entropy(student(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    run(args.warmup)
    return timed(run, args.steps, batch, device, args.repeats)


def measure_ceiling(args, specs, batch: int, device: torch.device) -> float:
    distiller = build(args, specs, device).to(memory_format=torch.channels_last).train()
    x, y = fixed_batch(batch, device, True)
    index = torch.arange(batch, device=device)
    epoch = torch.zeros((), device=device)
    lr = torch.tensor(0.05, device=device)
    config = train_config(batch)
    optimizer = make_optimizer(distiller.trainable_parameters(), config, lr)

    def step() -> None:
        with autocast(device, "auto"):
            out = distiller(x, y, index=index, epoch=epoch)
        out.loss.backward()
        optimizer.step()

    # PyTorch's recipe: warm up on a side stream (lazy state, cuDNN autotuning), then capture with the grads unset
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(args.warmup):
            optimizer.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    optimizer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    def run(n: int) -> None:
        for _ in range(n):
            graph.replay()

    return timed(run, args.steps, batch, device, args.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    parser.add_argument("--steps", type=int, default=50, help="steps per timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings per mode; the median is reported")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--output", default=None, help="JSON path; default results/throughput_<device>.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for batch in args.batch_sizes:
        floor = measure_floor(args, batch, device)
        for label, specs in variants(args.methods.split(",")):
            ours = measure_ours(args, specs, batch, device)
            ceiling = None
            if device.type == "cuda":
                try:
                    ceiling = measure_ceiling(args, specs, batch, device)
                except RuntimeError as error:  # reported, not hidden: the row then has no ceiling
                    print(f"{label}: capture failed: {str(error).splitlines()[0]}")
            row = {"method": label, "batch": batch, "ours": ours, "floor": floor, "ceiling": ceiling,
                   "ours_over_floor": ours / floor, "ours_over_ceiling": ours / ceiling if ceiling else None}
            rows.append(row)
            shown = f"{ceiling:8.0f}  ours/ceiling {ours / ceiling:.2f}" if ceiling else "     n/a"
            print(f"{label:16s} batch {batch:4d}  ours {ours:8.0f}  floor {floor:8.0f}  ceiling {shown}  "
                  f"ours/floor {ours / floor:.2f}", flush=True)
    result = {
        **provenance(device),
        "teacher": args.teacher,
        "student": args.student,
        "steps": args.steps,
        "repeats": args.repeats,
        "unit": "images per second",
        "rows": rows,
    }
    path = Path(args.output) if args.output else RESULTS / f"throughput_{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
