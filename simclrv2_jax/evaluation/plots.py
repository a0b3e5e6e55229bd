"""Figures: the pipeline's summary (each stage's training curve and the test accuracy it reached) and
the notebook's image grids (augmented views, nearest neighbours).

Figures are ``matplotlib.figure.Figure`` objects made without ``pyplot``: no global backend is chosen
or changed (a notebook keeps its inline backend), and nothing needs closing. Save one with
``fig.savefig(path)``; in a notebook ``display(fig)`` shows it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


def read_history(workdir: str) -> list[dict[str, float]]:
    """A stage's ``history.jsonl``: one dict per logged step (train and eval metrics)."""
    path = os.path.join(workdir, "history.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_summary(workdir: str, stages: list[str], summary: dict[str, Any], path: str) -> None:
    """Training loss of every stage and the test accuracy each one reached, in one PNG."""
    from matplotlib.figure import Figure

    curves = {
        "pretrain": "train/contrast_loss",
        "finetune": "train/sup_loss",
        "distill": "train/distill_loss",
        "baseline": "train/sup_loss",
        "student_baseline": "train/sup_loss",
    }
    fig = Figure(figsize=(4.2 * (len(stages) + 1), 3.6))
    axes = fig.subplots(1, len(stages) + 1)
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
        "student_baseline": "student net,\nsupervised only",
    }
    colors = {
        "pretrain": "tab:gray",
        "finetune": "tab:green",
        "distill": "tab:purple",
        "baseline": "tab:red",
        "student_baseline": "tab:pink",
    }
    names = [s for s in stages if summary["stages"][s].get("eval", {}).get("top1") is not None]
    values = [100 * summary["stages"][s]["eval"]["top1"] for s in names]
    bars = ax.bar(
        [labels[s] for s in names],
        values,
        color=[colors[s] for s in names],
    )
    for bar, value in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.1f}", ha="center", va="bottom")
    knn = summary.get("knn_top1")
    if knn:
        styles = (
            ("pretrained", "k-NN of h, pretrained", "-"),
            ("random_init", "k-NN of h, random init", ":"),
        )
        for key, label, style in (*styles, ("pixels", "k-NN of raw pixels", "--")):
            ax.axhline(
                100 * knn[key],
                color="black",
                linestyle=style,
                linewidth=1,
                label=f"{label}: {100 * knn[key]:.1f}",
            )
        ax.legend(loc="lower right", fontsize=7)
        values = values + [100 * v for v in knn.values()]
    ax.set_ylim(min(values + [100]) - 15 if values else 0, 100)
    ax.set_title(f"test top-1 (%), {summary.get('labels', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _show_image(ax, image, title: str | None = None) -> None:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    ax.imshow(
        image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255 if image.dtype == np.uint8 else 1
    )
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def views_figure(images, views, titles: list[str] | None = None):
    """A grid with one column per image: the image, then each of its augmented ``views`` below it.

    ``images``: ``[N, H, W(, C)]``; ``views``: a list of ``[N, h, w, C]`` arrays (float in [0, 1] or uint8).
    """
    from matplotlib.figure import Figure

    num, rows = len(images), 1 + len(views)
    fig = Figure(figsize=(1.3 * num, 1.4 * rows))
    axes = np.asarray(fig.subplots(rows, num, squeeze=False))
    for i in range(num):
        _show_image(axes[0, i], images[i], titles[i] if titles else None)
        for r, view in enumerate(views, start=1):
            _show_image(axes[r, i], view[i])
    for r in range(rows):
        axes[r, 0].set_ylabel("image" if r == 0 else f"view {r}", fontsize=8)
    fig.tight_layout()
    return fig


def neighbours_figure(queries, query_titles: list[str], neighbours, neighbour_titles: list[list[str]]):
    """One row per query: the query image, then its nearest neighbours, most similar first.

    ``neighbours``: ``[Q, k, H, W(, C)]``; ``neighbour_titles``: ``[Q][k]`` captions (label, similarity).
    """
    from matplotlib.figure import Figure

    num, k = len(queries), len(neighbours[0])
    fig = Figure(figsize=(1.3 * (k + 1), 1.45 * num))
    axes = np.asarray(fig.subplots(num, k + 1, squeeze=False))
    for q in range(num):
        _show_image(axes[q, 0], queries[q], f"query: {query_titles[q]}")
        for j in range(k):
            _show_image(axes[q, j + 1], neighbours[q][j], neighbour_titles[q][j])
    fig.tight_layout()
    return fig
