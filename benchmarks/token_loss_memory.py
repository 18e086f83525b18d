"""Peak memory of token-level LM distillation: chunked loss vs. naive full materialisation, on the CPU.

What is measured. One forward + backward of the distillation loss at LLM sizes (vocabulary ≥ 50k, sequence 2048,
bf16 logits as an LLM emits them), for two implementations with the same loss and gradients:

- naive: shift and mask, then ``fisherkd.functional.kd`` (or the named divergence) on the valid tokens, backward by
  autograd, which holds several fp32 [tokens × vocab] tensors for the backward pass;
- chunked: ``fisherkd.hf.token_distillation_loss`` (closed-form gradients written chunk by chunk into one buffer).

How. Each variant runs in a fresh subprocess, so allocator caches and earlier peaks cannot leak between them. The
worker builds its inputs (student and teacher logits, labels: the memory every implementation starts from), then
resets the kernel's peak-RSS counter (writing "5" to /proc/self/clear_refs, Linux ≥ 4.0) and reads VmRSS, runs the
loss and its backward, and reads the peak VmHWM. The reported peak is VmHWM − VmRSS-before: the resident memory the
loss added at its worst moment, including the gradient of the student logits that both variants must produce. RSS
counts memory actually touched, which on the CPU is what a large tensor costs. Without clear_refs the script falls
back on ru_maxrss minus VmRSS-before, valid because the inputs are created directly in their dtype without larger
transients.

Allocator. PyTorch's CPU tensors come from glibc malloc, whose mmap threshold is dynamic (raised up to 32 MiB after
each large free): chunk-sized buffers below it are then served from the heap and stay resident after being freed,
so the peak RSS of the chunked loss would depend on heap fragmentation (run-to-run differences of ~25% at small
chunks) rather than on the tensors alive. The workers therefore run with MALLOC_MMAP_THRESHOLD_=1048576, which fixes
the threshold at 1 MiB: every large tensor is its own mapping, returned on free, and RSS follows the live tensors.
Both variants run under the same setting (the naive one allocates only tensors above 32 MiB and is unaffected);
``--default-malloc`` measures without it.

The workers save the loss and the gradient; the parent reports their maximum absolute differences and writes JSON.
Run: ``python benchmarks/token_loss_memory.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULT = Path(__file__).parent / "results" / "token_loss_memory_cpu.json"
MMAP_THRESHOLD = 1 << 20


def rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def make_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    shape = (args.batch, args.seq, args.vocab)
    # made in their dtype directly: no fp32 transient larger than what the loss itself will touch
    student = torch.randn(shape, generator=g, dtype=dtype).mul_(2.0).requires_grad_()
    teacher = torch.randn(shape, generator=g, dtype=dtype).mul_(2.0)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    labels[:, : args.seq // 8] = -100  # a masked prompt, as in instruction tuning
    return student, teacher, labels


def naive_loss(student, teacher, labels, divergence: str, temperature: float) -> torch.Tensor:
    import fisherkd.functional as F

    valid = torch.zeros_like(labels, dtype=torch.bool)
    valid[:, :-1] = labels[:, 1:] != -100
    s, t = student[valid], teacher[valid]
    functions = {
        "forward_kl": lambda: F.kd(s, t, temperature=temperature),
        "reverse_kl": lambda: F.reverse_kl(s, t, temperature=temperature),
        "jsd": lambda: F.jsd(s, t, temperature=temperature),
        "tvd": lambda: F.tvd(s, t, temperature=temperature),
        "skew_kl": lambda: F.skew_kl(s, t, temperature=temperature),
        "skew_reverse_kl": lambda: F.skew_reverse_kl(s, t, temperature=temperature),
    }
    return functions[divergence]()


def worker(args: argparse.Namespace) -> None:
    from fisherkd.hf.token_losses import token_distillation_loss

    student, teacher, labels = make_inputs(args)
    resettable = reset_peak()
    before = rss_bytes()
    start = time.perf_counter()
    if args.worker == "naive":
        loss = naive_loss(student, teacher, labels, args.divergence, args.temperature)
    else:
        loss = token_distillation_loss(
            student, teacher, labels, args.divergence, args.temperature, chunk_size=args.chunk_size
        )
    loss.backward()
    seconds = time.perf_counter() - start
    peak = rss_bytes("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.save({"loss": loss.detach(), "grad": student.grad}, args.save)
    print(json.dumps({"peak_bytes": peak - before, "rss_before": before, "seconds": seconds, "reset": resettable}))


def run_variant(args: argparse.Namespace, variant: str, save: Path, chunk_size: int) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--save", str(save), "--chunk-size", str(chunk_size)]
    for name in ("vocab", "seq", "batch", "dtype", "divergence", "temperature"):
        command += [f"--{name}", str(getattr(args, name))]
    env = dict(os.environ)
    if not args.default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=50257)  # GPT-2's vocabulary
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--divergence", default="forward_kl")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--chunk-size", type=int, nargs="+", default=[1024, 256, 128])
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--default-malloc", action="store_true", help="keep glibc's dynamic mmap threshold")
    parser.add_argument("--worker", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.chunk_size = args.chunk_size[0]
        worker(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        naive = run_variant(args, "naive", Path(tmp) / "naive.pt", 0)
        reference = torch.load(Path(tmp) / "naive.pt", weights_only=True)
        chunked = []
        for chunk_size in args.chunk_size:
            result = run_variant(args, "chunked", Path(tmp) / "chunked.pt", chunk_size)
            ours = torch.load(Path(tmp) / "chunked.pt", weights_only=True)
            grad_diff = (ours["grad"].float() - reference["grad"].float()).abs().max().item()
            chunked.append(
                {
                    "chunk_size": chunk_size,
                    "peak_bytes": result["peak_bytes"],
                    "ratio_to_naive": result["peak_bytes"] / naive["peak_bytes"],
                    "seconds": result["seconds"],
                    "loss_abs_diff": abs(ours["loss"].item() - reference["loss"].item()),
                    "grad_max_abs_diff": grad_diff,
                }
            )
            del ours
        grad_scale = reference["grad"].float().abs().max().item()

    logits_bytes = args.batch * args.seq * args.vocab * torch.finfo(getattr(torch, args.dtype)).bits // 8
    report = {
        "benchmark": "token_loss_memory",
        "device": f"cpu: {cpu_name()}",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "method": "peak RSS added by loss forward+backward, fresh subprocess per variant (see script docstring)",
        "peak_reset_with_clear_refs": naive["reset"],
        "malloc": "glibc default" if args.default_malloc else f"glibc, MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}",
        "sizes": {
            "batch": args.batch,
            "sequence": args.seq,
            "vocab": args.vocab,
            "dtype": args.dtype,
            "masked_prompt_tokens": args.seq // 8,
            "logits_bytes_each": logits_bytes,
        },
        "divergence": args.divergence,
        "temperature": args.temperature,
        "naive": {"peak_bytes": naive["peak_bytes"], "seconds": naive["seconds"]},
        "chunked": chunked,
        "loss": reference["loss"].item(),
        "grad_max_abs": grad_scale,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
