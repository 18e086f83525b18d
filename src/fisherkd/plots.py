"""Plots written next to the numbers they show (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402

from fisherkd.tracking import read_metrics  # noqa: E402


def plot_run(run_dir: str | Path) -> Path:
    """Training loss and test accuracy/agreement against steps → ``plots/curves.png``."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot([r["step"] for r in train], [r["loss"] for r in train], label="total loss")
    left.set(xlabel="optimizer step", ylabel="training loss", yscale="log", title="Training loss")
    left.legend()
    for key, label in [("accuracy", "test accuracy"), ("agreement", "agreement with teacher")]:
        if test and key in test[0]:
            right.plot([r["step"] for r in test], [100 * r[key] for r in test], marker="o", label=label)
    right.set(xlabel="optimizer step", ylabel="%", title="Test accuracy and fidelity")
    right.legend()
    fig.tight_layout()
    out = run_dir / "plots" / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_comparison(
    labels: Sequence[str],
    means: Sequence[float],
    stds: Sequence[float],
    path: str | Path,
    reference: dict[str, float] | None = None,
    xlabel: str = "student test accuracy (%)",
    title: str = "",
) -> Path:
    """Horizontal bars of mean ± std per variant, top to bottom in the given order, with vertical reference lines
    (e.g. the teacher). Horizontal, so that thirty long variant names stay readable."""
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(labels) + 1.6))
    rows = range(len(labels))
    bars = ax.barh(rows, means, xerr=stds, capsize=3, color="#4C72B0", height=0.7)
    ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], padding=4, fontsize=8)
    ax.set_yticks(rows, labels, fontsize=8)
    ax.invert_yaxis()  # the first variant (usually scratch) on top
    for i, (name, value) in enumerate((reference or {}).items()):
        ax.axvline(value, linestyle="--", color=f"C{i + 1}", label=f"{name} {value:.1f}")
    low = min([m - s for m, s in zip(means, stds)] + list((reference or {}).values()))
    high = max([m + s for m, s in zip(means, stds)] + list((reference or {}).values()))
    ax.set_xlim(max(0.0, low - 5), min(100.0, high + 4))
    ax.set(xlabel=xlabel, title=title)
    if reference:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_fisher_weights(weights: Mapping[str, Tensor], path: str | Path, width: int = 32) -> Path:
    """Heat map of Fisher weights, one panel per weighted method and axis (e.g. ``plots/fisher_weights.png``).

    Vectors (per class, channel or head) wrap into rows of ``width`` cells in index order; 2-D maps (the mean
    per-position weights) are drawn as they are. Colours are on a log scale centred on 1, the mean weight: red
    cells count more than average in the loss, blue ones less.
    """
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import MaxNLocator

    panels = []
    for label, w in weights.items():
        values = w.detach().float().cpu().numpy()
        if values.ndim == 1:
            rows = -(-values.size // width)
            grid = np.full(rows * min(width, values.size), np.nan)
            grid[: values.size] = values
            values = grid.reshape(rows, min(width, values.size))
        panels.append((label, values))
    low = min(float(np.nanmin(v)) for _, v in panels)
    high = max(float(np.nanmax(v)) for _, v in panels)
    bound = max(high, 1.0 / low, 1.001)
    heights = [max(1.0, 0.35 * v.shape[0] + 0.9) for _, v in panels]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(8, sum(heights) + 0.6), squeeze=False, gridspec_kw={"height_ratios": heights}
    )
    for ax, (label, values) in zip(axes[:, 0], panels):
        image = ax.imshow(values, cmap="coolwarm", norm=LogNorm(1.0 / bound, bound), aspect="auto",
                          interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.set_yticks(range(values.shape[0]), [str(r * values.shape[1]) for r in range(values.shape[0])],
                      fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10) if 1 / bound <= t <= bound]
        bar = fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01, label="weight", ticks=ticks)
        bar.ax.set_yticklabels([f"{t:g}" for t in ticks], fontsize=7)
        bar.ax.minorticks_off()
    axes[-1, 0].set_xlabel("index (row label + column)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_heatmap(
    matrix: Tensor, rows: Sequence[str], columns: Sequence[str], path: str | Path, title: str, xlabel: str, ylabel: str
) -> Path:
    """An annotated heat map in [0, 1] (e.g. CKA between teacher stages and student stages)."""
    fig, ax = plt.subplots(figsize=(1.1 * len(columns) + 3, 0.7 * len(rows) + 2))
    image = ax.imshow(matrix.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(columns)):
            value = float(matrix[i, j])
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
