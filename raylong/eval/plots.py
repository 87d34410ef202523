"""PNG figures of evaluations: passkey heatmaps (length x depth), retrieval and loss curves (matplotlib, Agg)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def passkey_heatmap(per_stage: dict[str, dict[str, dict[str, float]]], path: str) -> str:
    """One panel per stage: rows = context length, columns = depth, colour = exact-match accuracy."""
    stages = [s for s, grid in per_stage.items() if grid]
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(3.2 * max(1, len(stages)), 3), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        grid = per_stage[stage]
        lengths = sorted(grid, key=int)
        depths = sorted({d for row in grid.values() for d in row}, key=float)
        acc = np.array([[grid[length].get(d, np.nan) for d in depths] for length in lengths])
        ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(depths)), [f"{float(d):.0%}" for d in depths], fontsize=7)
        ax.set_yticks(range(len(lengths)), lengths, fontsize=7)
        ax.set_xlabel("depth")
        ax.set_ylabel("context tokens")
        ax.set_title(stage, fontsize=9)
    fig.suptitle("passkey exact match")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _finish(fig, ax, xlabel: str, ylabel: str, path: str) -> str:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def position_curve(per_stage: dict[str, dict[str, float]], path: str) -> str:
    """Mean held-out loss per position bucket (log-x), one line per stage."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for stage, buckets in per_stage.items():
        if not buckets:
            continue
        mids = [(int(k.split("-")[0]) + int(k.split("-")[1])) / 2 for k in buckets]
        ax.plot(mids, list(buckets.values()), marker="o", label=stage)
    ax.set_xscale("log", base=2)
    return _finish(fig, ax, "token position", "held-out loss", path)


def loss_curves(per_stage: dict[str, list[float]], path: str) -> str:
    """All stages' training loss on one figure, stages laid end to end."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    offset = 0
    for stage, losses in per_stage.items():
        ax.plot(range(offset, offset + len(losses)), losses, label=stage)
        offset += len(losses)
    return _finish(fig, ax, "step (chain)", "train loss", path)


def task_curves(tasks: dict[str, dict[str, float]], path: str, title: str = "") -> str:
    """Exact-match accuracy per context length (log-x), one line per retrieval task."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for task, by_length in tasks.items():
        lengths = sorted(by_length, key=int)
        ax.plot([int(n) for n in lengths], [by_length[n] for n in lengths], marker="o", label=task)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title, fontsize=9)
    return _finish(fig, ax, "context tokens", "exact match", path)


def stage_task_curves(per_stage: dict[str, dict[str, dict[str, float]]], path: str) -> str:
    """One panel per retrieval task: exact match per context length (log-x), one line per stage; the base
    model's dashed, so what each stage added beyond the base's native length shows."""
    tasks = sorted({t for by_task in per_stage.values() for t in by_task}, key=lambda t: (t != "passkey", t))
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(4.2 * max(1, len(tasks)), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for stage, by_task in per_stage.items():
            by_length = by_task.get(task)
            if not by_length:
                continue
            lengths = sorted(by_length, key=int)
            ax.plot([int(n) for n in lengths], [by_length[n] for n in lengths], marker="o", label=stage,
                    linestyle="--" if stage == "base" else "-")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("context tokens")
        ax.set_ylabel("exact match")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
