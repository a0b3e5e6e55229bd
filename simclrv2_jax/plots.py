"""The pipeline's summary figure: each stage's training curve and the test accuracy it reached."""

from __future__ import annotations

import json
import os
from typing import Any


def read_history(workdir: str) -> list[dict[str, float]]:
    """A stage's ``history.jsonl``: one dict per logged step (train and eval metrics)."""
    path = os.path.join(workdir, "history.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_summary(workdir: str, stages: list[str], summary: dict[str, Any], path: str) -> None:
    """Training loss of every stage and the test accuracy each one reached, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {
        "pretrain": "train/contrast_loss",
        "finetune": "train/sup_loss",
        "distill": "train/distill_loss",
        "baseline": "train/sup_loss",
    }
    fig, axes = plt.subplots(1, len(stages) + 1, figsize=(4.2 * (len(stages) + 1), 3.6))
    for ax, stage in zip(axes, stages):
        history = read_history(os.path.join(workdir, stage))
        rows = [r for r in history if curves[stage] in r]
        ax.plot([r["step"] for r in rows], [r[curves[stage]] for r in rows], color="tab:blue")
        ax.set_title(f"{stage}: {curves[stage].split('/')[1]}")
        ax.set_xlabel("step")
        evals = [r for r in history if "eval/top1" in r]
        if evals:
            twin = ax.twinx()
            twin.plot(
                [r["step"] for r in evals], [100 * r["eval/top1"] for r in evals], "o-", color="tab:orange"
            )
            twin.set_ylabel("test top-1 (%)", color="tab:orange")
    ax = axes[-1]
    labels = {
        "pretrain": "linear eval\n(pretrain)",
        "finetune": "fine-tuned",
        "distill": "distilled",
        "baseline": "supervised\nonly",
    }
    names = [s for s in stages if summary["stages"][s].get("eval", {}).get("top1") is not None]
    values = [100 * summary["stages"][s]["eval"]["top1"] for s in names]
    bars = ax.bar(
        [labels[s] for s in names],
        values,
        color=["tab:gray", "tab:green", "tab:purple", "tab:red"][: len(names)],
    )
    for bar, value in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.1f}", ha="center", va="bottom")
    ax.set_ylim(min(values + [100]) - 15 if values else 0, 100)
    ax.set_title(f"test top-1 (%), {summary.get('labels', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
