"""A sweep's results: each run's status and ``results.json`` in ``sweep.csv``, ``sweep.png`` and a table.

Status of a run: ``finished`` (ran to the end with this very config), ``running`` (a live process
holds its workdir), ``stopped`` (started but not finished: interrupted, or stopped by an error),
``stale`` (finished, but with another config: the base overrides changed since) or ``missing`` (never
started). Metrics are filled in for finished runs only.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from typing import Any

from absl import logging
from etils import epath

from simclrv2_jax.checkpoints import workdir as workdir_lib
from simclrv2_jax.sweeps.plan import Run, swept_fields

RECORD_NAME, CSV_NAME, PLOT_NAME = "sweep.json", "sweep.csv", "sweep.png"
# What results.json holds besides its ``eval`` and ``train`` metrics that a sweep compares.
RESULT_FIELDS = ("final_step", "total_steps", "skipped_steps", "steps_per_sec", "wall_time_s")


def run_status(run: Run) -> tuple[str, dict[str, Any] | None]:
    """``(status, results)``: see the module docstring; ``results`` only for a finished run."""
    path = epath.Path(run.workdir)
    try:
        results = workdir_lib.finished_results(run.workdir, run.config)
        if results is not None:
            return "finished", results
        if workdir_lib.running_run(path) is not None:
            return "running", None
        try:
            if json.loads((path / "results.json").read_text()).get("completed"):
                return "stale", None
        except (OSError, ValueError):
            pass
        return ("stopped" if path.exists() else "missing"), None
    except Exception as e:
        if "://" not in run.workdir:
            raise
        # An object store that cannot be read from here (no credentials) says nothing about the run.
        logging.warning("sweep: cannot read %s (%s); counted as missing.", run.workdir, e)
        return "missing", None


def metrics(results: dict[str, Any]) -> dict[str, float]:
    """``{"eval.top1": ..., "train.loss": ..., "final_step": ..., ...}``: the numbers of a results.json."""
    flat = {}
    for group in ("eval", "train"):
        for key, value in sorted((results.get(group) or {}).items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"{group}.{key}"] = value
    for key in RESULT_FIELDS:
        value = results.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[key] = value
    return flat


def collect(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per run: ``name``, each swept field's value, ``status``, then the run's metrics."""
    fields = swept_fields(runs)
    rows = []
    for run in runs:
        status, results = run_status(run)
        row = {"name": run.name, **{f: run.value(f) for f in fields}, "status": status}
        row.update(metrics(results) if results else {})
        rows.append(row)
    return rows


def metric_columns(rows: Sequence[dict[str, Any]], first: int) -> list[str]:
    """The metric columns of ``rows`` (their keys after the first ``first``): eval, train, the rest."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(list(row)[first:]))
    order = {"eval": 0, "train": 1}
    return sorted(keys, key=lambda k: (order.get(k.split(".")[0], 2), k if "." in k else ""))


def csv_text(runs: Sequence[Run], rows: Sequence[dict[str, Any]]) -> str:
    fields = swept_fields(runs)
    columns = ["name", *fields, "status", *metric_columns(rows, len(fields) + 2)]
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def log_axis(values: Sequence[float]) -> bool:
    """Whether sorted distinct values read better on a log axis: positive, and spanning a factor of
    10 or more, or a geometric grid (0.025, 0.05, 0.1) that is not an arithmetic one."""
    if values[0] <= 0:
        return False
    if values[-1] >= 10 * values[0]:
        return True
    if len(values) < 3:
        return False
    ratios = [b / a for a, b in zip(values, values[1:])]
    steps = [b - a for a, b in zip(values, values[1:])]
    return max(ratios) / min(ratios) < 1.1 and max(steps) / min(steps) >= 1.1


def sweep_figure(runs: Sequence[Run], rows: Sequence[dict[str, Any]], metric: str):
    """``metric`` against the first swept field, one line per value of the other swept fields (one
    line with a single field); a bar per run when no field is swept. Numeric values on a numeric axis
    (logarithmic as ``log_axis`` says), others as categories in sweep order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = swept_fields(runs)
    points = [(run, row[metric]) for run, row in zip(runs, rows) if _is_number(row.get(metric))]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.set_ylabel(metric)
    if not points:
        note = f"no finished run has {metric} yet"
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes)
    elif not fields:
        ax.bar([run.name for run, _ in points], [y for _, y in points])
    else:
        x_field, others = fields[0], fields[1:]
        xs = [run.value(x_field) for run, _ in points]
        numeric = all(_is_number(x) for x in xs)
        categories = list(dict.fromkeys(map(str, xs)))
        groups: dict[tuple, list[tuple[Any, float]]] = {}
        for (run, y), x in zip(points, xs):
            key = tuple((f, run.value(f)) for f in others)
            groups.setdefault(key, []).append((x if numeric else categories.index(str(x)), y))
        for key, line in groups.items():
            line.sort(key=lambda p: p[0])
            label = ", ".join(f"{f}={v}" for f, v in key) or None
            ax.plot([p[0] for p in line], [p[1] for p in line], marker="o", label=label)
        if numeric:
            values = sorted(set(xs))
            if log_axis(values):
                ax.set_xscale("log")
                ax.minorticks_off()
            ax.set_xticks(values, [f"{v:g}" for v in values])
        else:
            ax.set_xticks(range(len(categories)), categories)
        ax.set_xlabel(x_field)
        if others:
            ax.legend(title=", ".join(others), fontsize="small")
    finished = sum(row["status"] == "finished" for row in rows)
    ax.set_title(f"{metric}: {finished} of {len(rows)} runs finished")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_png(runs: Sequence[Run], rows: Sequence[dict[str, Any]], metric: str) -> bytes:
    """``sweep_figure`` as PNG bytes."""
    import matplotlib.pyplot as plt

    fig = sweep_figure(runs, rows, metric)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=110)
    plt.close(fig)
    return out.getvalue()


def _format(metric: str, value: Any) -> str:
    if not _is_number(value) or not math.isfinite(value):
        return "-" if value is None else str(value)
    if metric.rsplit(".", 1)[-1] in ("top1", "top5") or "acc" in metric:
        return f"{100 * value:.2f}%"
    return f"{value:.4g}"


def best_run(rows: Sequence[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The row with the best ``metric`` (the lowest for a loss, else the highest)."""
    scored = [row for row in rows if _is_number(row.get(metric))]
    if not scored:
        return None
    sign = -1 if "loss" in metric else 1
    return max(scored, key=lambda row: sign * row[metric])


def table(runs: Sequence[Run], rows: Sequence[dict[str, Any]], metric: str) -> str:
    """A Markdown table: the swept fields (the name when none), status, ``metric``, steps, wall time."""
    fields = swept_fields(runs) or ["name"]
    best = best_run(rows, metric)
    lines = [
        "| " + " | ".join([*fields, "status", metric, "steps", "wall time"]) + " |",
        "|" + "---|" * (len(fields) + 4),
    ]
    for row in rows:
        wall = row.get("wall_time_s")
        cells = [str(row[f]) for f in fields] + [
            row["status"],
            _format(metric, row.get(metric)) + (" (best)" if row is best else ""),
            str(row.get("final_step", "-")),
            f"{wall / 60:.1f} min" if _is_number(wall) else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_record(workdir: str, runs: Sequence[Run], **about: Any) -> None:
    """``sweep.json``: how the sweep was launched (``about``) and its runs (index, name, workdir,
    overrides)."""
    record = dict(
        about,
        runs=[dict(index=r.index, name=r.name, workdir=r.workdir, overrides=r.overrides) for r in runs],
    )
    (epath.Path(workdir) / RECORD_NAME).write_text(json.dumps(record, indent=2, default=repr) + "\n")


def write_report(workdir: str, runs: Sequence[Run], metric: str) -> tuple[list[dict[str, Any]], str]:
    """Collects the runs into ``sweep.csv`` and ``sweep.png`` in ``workdir``; ``(rows, table)``."""
    rows = collect(runs)
    root = epath.Path(workdir)
    (root / CSV_NAME).write_text(csv_text(runs, rows))
    (root / PLOT_NAME).write_bytes(plot_png(runs, rows, metric))
    if any(row["status"] == "finished" for row in rows) and not any(metric in row for row in rows):
        names = metric_columns(rows, len(swept_fields(runs)) + 2)
        logging.warning("sweep: no run's results have %s; they have %s.", metric, ", ".join(names))
    return rows, table(runs, rows, metric)
