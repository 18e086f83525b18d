"""Step-time overhead of Fisher weighting: each method weighted against the same method unweighted, in one process.

What is measured. One full training step as the engine runs it (Distiller forward with the teacher's inference,
backward, SGD step, ``after_optimizer_step``), for a plain and a Fisher-weighted Distiller of the same method, same
models and batch. The two alternate in rounds of ``--steps`` steps (a multiple of the update period K = 4, so every
round contains the same number of Fisher updates); the ratio is median weighted round / median plain round, which
cancels slow drifts of a shared machine. Setups: CIFAR-size ResNet-20 → ResNet-8 (kd, fitnet, at; batch 64, 32×32)
and ViT (dim 64, depth 4 → dim 32, depth 2, 4 heads; minilm on attention probabilities), and the demo's MNIST-1D
pair (1-D CNN → MLP 40-100-100-10, batch 100 as in the demo: ``--only "demo mlp" --batch-size 100``), whose step is
so small that the fixed cost of a weighting (its number of small kernels) is what shows.

Rows use the defaults of the ``fisher:`` block (EMA axes: update every 4 steps on a quarter of the batch) except
``at, position``: per-sample position maps need an activation Fisher of the whole batch every step, which is why
they are opt-in; it is here to show that cost. The ``direction`` rows weight the hint by a C×C Fisher metric
(DESIGN.md §4b): the same EMA schedule, plus one eigen-decomposition of the 64×64 statistic after each update.
On CUDA the step runs under bf16 autocast, as the engine does.
Target: ≤ 1.05× on a GPU. Run: ``python benchmarks/fisher_overhead.py`` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fisherkd.distiller import Distiller
from fisherkd.engine.trainer import autocast
from fisherkd.models import create_model

RESULTS = Path(__file__).parent / "results"

RESNET = ("resnet20", "resnet8", (3, 32, 32))
VIT = ("vit_tiny", "vit_tiny", (3, 32, 32))
DEMO = ("cnn1d", "mlp", (40,))  # the demo's MNIST-1D pair: a step of ~2 ms on a CPU, where fixed costs show
CASES: list[tuple[str, tuple, dict[str, Any], dict[str, Any]]] = [
    ("kd · sample (logit closed form)", RESNET, {"name": "kd"}, {"axis": "sample"}),
    ("kd · sample (wsl, student-aware)", RESNET, {"name": "kd"}, {"axis": "sample", "estimator": "wsl"}),
    # the demo's MLP (use --batch-size 100 as the demo does): per-sample weights are a handful of small kernels
    ("demo mlp · kd · sample (logit, gamma 0.5)", DEMO, {"name": "kd"}, {"axis": "sample", "gamma": 0.5}),
    ("demo mlp · kd · sample (wsl)", DEMO, {"name": "kd"}, {"axis": "sample", "estimator": "wsl"}),
    ("demo mlp · fisher_logit · class (non_target)", DEMO, {"name": "fisher_logit"},
     {"axis": "class", "estimator": "non_target"}),
    ("fitnet · channel (sampled)", RESNET, {"name": "fitnet", "pairs": [["layer3", "layer3"]]}, {"axis": "channel"}),
    (
        "fitnet · channel (linear_head closed form)",
        RESNET,
        {"name": "fitnet", "pairs": [["layer3", "layer3"]]},
        {"axis": "channel", "estimator": "linear_head"},
    ),
    ("at · channel (sampled)", RESNET, {"name": "at", "pairs": [["layer3", "layer3"]]}, {"axis": "channel"}),
    ("at · position (sampled, every step)", RESNET, {"name": "at", "pairs": [["layer3", "layer3"]]},
     {"axis": "position"}),
    # Fisher directions (a 64×64 EMA metric, eigen-decomposed after each update) at layer3 and the head's input
    ("fitnet · direction (sampled)", RESNET, {"name": "fitnet", "pairs": [["layer3", "layer3"]]},
     {"axis": "direction"}),
    ("fitnet · direction complement (sampled)", RESNET, {"name": "fitnet", "pairs": [["layer3", "layer3"]]},
     {"axis": "direction", "directions": "complement"}),
    ("fitnet · direction (linear_head closed form)", RESNET, {"name": "fitnet", "pairs": [["head:in", "head:in"]]},
     {"axis": "direction", "estimator": "linear_head"}),
    ("fitnet · direction row (head weight)", RESNET, {"name": "fitnet", "pairs": [["head:in", "head:in"]]},
     {"axis": "direction", "directions": "row"}),
    (
        "minilm · head (sampled)",
        VIT,
        {"name": "minilm", "pairs": [["blocks.1.attn.probs", "blocks.3.attn.probs"]]},
        {"axis": "head"},
    ),
]


def models(setup: tuple) -> tuple[torch.nn.Module, torch.nn.Module]:
    teacher_name, student_name, _ = setup
    torch.manual_seed(0)
    if teacher_name == "cnn1d":
        return create_model("cnn1d", 1, 10), create_model("mlp", 1, 10)
    if teacher_name == "vit_tiny":
        return create_model("vit_tiny", 3, 100), create_model("vit_tiny", 3, 100, dim=32, depth=2)
    return create_model(teacher_name, 3, 100), create_model(student_name, 3, 100)


def build(setup: tuple, method: dict, fisher: dict | None, device: torch.device) -> Distiller:
    teacher, student = models(setup)
    spec = {"weight": 1.0, **method, **({"fisher": fisher} if fisher else {})}
    example = torch.randn(2, *setup[2], device=device)
    methods = [{"name": "ce", "weight": 0.1}, spec]
    return Distiller(student.to(device), teacher.to(device), methods, example_input=example).train()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_steps(distiller: Distiller, optimizer: torch.optim.Optimizer, x, y, steps: int, device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        with autocast(device, "auto"):
            out = distiller(x, y)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        distiller.after_optimizer_step()
    sync(device)
    return (time.perf_counter() - start) / steps


def measure(case: tuple, device: torch.device, batch: int, steps: int, rounds: int) -> dict[str, Any]:
    label, setup, method, fisher = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *setup[2], generator=g).to(device)
    y = torch.randint(0, 10 if setup is DEMO else 100, (batch,), generator=g).to(device)
    variants = {"plain": build(setup, method, None, device), "weighted": build(setup, method, fisher, device)}
    optimizers = {k: torch.optim.SGD(d.trainable_parameters(), lr=1e-3, momentum=0.9) for k, d in variants.items()}
    times: dict[str, list[float]] = {"plain": [], "weighted": []}
    for name, distiller in variants.items():
        run_steps(distiller, optimizers[name], x, y, steps, device)  # warm-up
    for r in range(rounds):
        for name in ("plain", "weighted") if r % 2 == 0 else ("weighted", "plain"):
            times[name].append(run_steps(variants[name], optimizers[name], x, y, steps, device))
    plain, weighted = statistics.median(times["plain"]), statistics.median(times["weighted"])
    return {
        "case": label,
        "method": method,
        "fisher": fisher,
        "plain_ms_per_step": 1e3 * plain,
        "weighted_ms_per_step": 1e3 * weighted,
        "ratio": weighted / plain,
        "rounds_ms": {k: [round(1e3 * t, 3) for t in v] for k, v in times.items()},
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="steps per round (a multiple of the update period 4)")
    parser.add_argument("--rounds", type=int, default=12)
    # One thread by default on the CPU: on a shared 2-core machine, multi-threaded kernels stall at OpenMP barriers
    # whenever another process takes a core, and step times jump tenfold.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--only", default=None, help="run only the rows whose label contains this text")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    rows = []
    for case in [c for c in CASES if args.only is None or args.only in c[0]]:
        row = measure(case, device, args.batch_size, args.steps, args.rounds)
        rows.append(row)
        print(f"{row['case']:<45} plain {row['plain_ms_per_step']:8.1f} ms  weighted "
              f"{row['weighted_ms_per_step']:8.1f} ms  ratio {row['ratio']:.3f}", flush=True)
    result = {
        "benchmark": "fisher_overhead",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()})",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "only": args.only,
        "amp": "bf16" if device.type == "cuda" else "off",
        "target": "weighted / plain <= 1.05 on a GPU",
        "rows": rows,
    }
    # a partial run (--only) never overwrites the full table
    suffix = "" if args.only is None else "_" + re.sub(r"\W+", "_", args.only).strip("_")
    out = args.out or RESULTS / f"fisher_overhead_{device.type}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
