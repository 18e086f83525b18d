"""Peak memory of token-level LM distillation: chunked loss vs. naive full materialisation, on the CPU.

What is measured. Forward + backward of the distillation loss at LLM sizes (vocabularies 32,000 and 50,257,
sequence 2048, bf16 logits as an LLM emits them), repeated for a few steps, for two implementations with the same
loss and gradients:

- naive: shift and mask, then ``fisherkd.functional.kd`` (or the named divergence) on the valid tokens, backward by
  autograd, which holds several fp32 [tokens × vocab] tensors for the backward pass;
- chunked: ``fisherkd.hf.token_distillation_loss`` (closed-form gradients written chunk by chunk into one buffer),
  with its default chunks (8 MiB of fp32 per work tensor) and with fixed token counts (``--chunk-size``).

How. Each variant runs in a fresh subprocess, so allocator caches and earlier peaks cannot leak between them. The
worker builds its inputs (student and teacher logits, labels: the memory every implementation starts from) and
reads VmRSS; then, for each of ``--steps`` steps, it resets the kernel's peak-RSS counter (writing "5" to
/proc/self/clear_refs, Linux ≥ 4.0), runs the loss and its backward, drops the gradient, and reads the peak
VmHWM. A step's peak is VmHWM − VmRSS-before-the-first-step: the resident memory the loss added at its worst
moment, including the gradient of the student logits that both variants must produce and whatever the allocator
kept resident from earlier steps. The reported peak is the maximum over the steps. RSS counts memory actually
touched, which on the CPU is what a large tensor costs (tracemalloc and torch's own counters miss the allocator's
retained heap). Without clear_refs the script falls back on ru_maxrss minus VmRSS-before.

Allocator. The workers run under glibc's default malloc, as a user's process does. Its mmap threshold is dynamic
(raised up to 32 MiB after each large free), so blocks below it come from the heap and stay resident after being
freed; that is why the default chunk is sized in bytes. ``--mmap-threshold BYTES`` fixes the threshold
(MALLOC_MMAP_THRESHOLD_) instead, so that RSS follows the live tensors: for comparison only.

The workers save the loss and the gradient; the parent reports their maximum absolute differences and writes JSON.
Run: ``python benchmarks/token_loss_memory.py`` (about four minutes on 2 busy cores).
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

from fisherkd.provenance import provenance
from rss import reset_peak, rss_bytes  # noqa: E402  (benchmarks/ is the script's folder)

RESULT = Path(__file__).parent / "results" / "token_loss_memory_cpu.json"


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

    if args.threads:
        torch.set_num_threads(args.threads)
    student, teacher, labels = make_inputs(args)
    before = rss_bytes()
    peaks, seconds = [], []
    for _ in range(args.steps):
        resettable = reset_peak()
        start = time.perf_counter()
        if args.worker == "naive":
            loss = naive_loss(student, teacher, labels, args.divergence, args.temperature)
        else:
            chunk_size = args.chunk_size or None  # 0: the loss's default, sized in bytes
            loss = token_distillation_loss(
                student, teacher, labels, args.divergence, args.temperature, chunk_size=chunk_size
            )
        loss.backward()
        seconds.append(time.perf_counter() - start)
        peak = rss_bytes("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peaks.append(peak - before)
        if len(peaks) < args.steps:
            student.grad = None  # as an optimizer's zero_grad(set_to_none=True): no gradient alive into the next step
    torch.save({"loss": loss.detach(), "grad": student.grad}, args.save)
    print(json.dumps({"peak_bytes": peaks, "rss_before": before, "seconds": seconds, "reset": resettable}))


def run_variant(args: argparse.Namespace, vocab: int, variant: str, save: Path, chunk_size: int) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--save", str(save), "--chunk-size", str(chunk_size)]
    command += ["--vocab", str(vocab)]
    for name in ("seq", "batch", "dtype", "divergence", "temperature", "steps", "threads"):
        command += [f"--{name}", str(getattr(args, name))]
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(args: argparse.Namespace, vocab: int) -> dict:
    from fisherkd.hf.token_losses import chunk_rows

    with tempfile.TemporaryDirectory() as tmp:
        naive = run_variant(args, vocab, "naive", Path(tmp) / "naive.pt", 0)
        reference = torch.load(Path(tmp) / "naive.pt", weights_only=True)
        chunked = []
        for chunk_size in args.chunk_size:
            result = run_variant(args, vocab, "chunked", Path(tmp) / "chunked.pt", chunk_size)
            ours = torch.load(Path(tmp) / "chunked.pt", weights_only=True)
            tokens = chunk_rows(chunk_size or None, vocab)
            chunked.append(
                {
                    "chunk_size": "default (8 MiB)" if chunk_size == 0 else chunk_size,
                    "chunk_tokens": tokens,
                    "chunk_fp32_mib": tokens * vocab * 4 / 2**20,
                    "peak_bytes": max(result["peak_bytes"]),
                    "peak_bytes_per_step": result["peak_bytes"],
                    "ratio_to_naive": max(result["peak_bytes"]) / max(naive["peak_bytes"]),
                    "seconds_per_step": result["seconds"],
                    "loss_abs_diff": abs(ours["loss"].item() - reference["loss"].item()),
                    "grad_max_abs_diff": (ours["grad"].float() - reference["grad"].float()).abs().max().item(),
                }
            )
            del ours
    logits_bytes = args.batch * args.seq * vocab * torch.finfo(getattr(torch, args.dtype)).bits // 8
    return {
        "vocab": vocab,
        "logits_bytes_each": logits_bytes,
        "naive": {
            "peak_bytes": max(naive["peak_bytes"]),
            "peak_bytes_per_step": naive["peak_bytes"],
            "seconds_per_step": naive["seconds"],
        },
        "chunked": chunked,
        "loss": reference["loss"].item(),
        "grad_max_abs": reference["grad"].float().abs().max().item(),
        "peak_reset_with_clear_refs": naive["reset"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 50257])  # Llama-2's and GPT-2's
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--divergence", default="forward_kl")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=3, help="forward+backward steps per variant; the max is reported")
    parser.add_argument(
        "--chunk-size", type=int, nargs="+", default=[0, 256], help="tokens per chunk; 0 = the default (8 MiB)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch's default)")
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--mmap-threshold", type=int, default=0, help="fix glibc's mmap threshold (bytes)")
    parser.add_argument("--worker", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.chunk_size, args.vocab = args.chunk_size[0], args.vocab[0]
        worker(args)
        return

    load_before = os.getloadavg()
    results = [measure(args, vocab) for vocab in args.vocab]
    report = {
        "benchmark": "token_loss_memory",
        **provenance("cpu"),
        "glibc": "-".join(platform.libc_ver()),
        "threads": args.threads or torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
        # times are wall-clock on a possibly shared machine: the 1-minute load average around the run says how shared
        "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "method": "max over steps of the peak RSS added by loss forward+backward, fresh subprocess per variant "
        "(see script docstring)",
        "malloc": f"glibc, MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}" if args.mmap_threshold else "glibc default",
        "sizes": {
            "batch": args.batch,
            "sequence": args.seq,
            "dtype": args.dtype,
            "masked_prompt_tokens": args.seq // 8,
        },
        "steps": args.steps,
        "divergence": args.divergence,
        "temperature": args.temperature,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    summary = [
        (r["vocab"], c["chunk_size"], round(c["peak_bytes"] / 2**20), round(c["ratio_to_naive"], 3))
        for r in results
        for c in r["chunked"]
    ]
    print(json.dumps({"naive_mib": [round(r["naive"]["peak_bytes"] / 2**20) for r in results], "chunked": summary}))


if __name__ == "__main__":
    main()
