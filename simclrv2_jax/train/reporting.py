"""Where training reports go: TensorBoard scalars, progress lines (steps/s, ETA), ``history.jsonl``,
the workdir's JSON files, and the averaging of a logged interval's metrics.

With TensorFlow installed this is clu's (``AsyncWriter(SummaryWriter)``, ``ReportProgress``,
``Profile``). clu's writers and periodic actions import TensorFlow, so where it is absent (an
accelerator host training on in-memory data with augmentation on the device) the same scalars go to
TensorBoard event files through the ``tensorboard`` package's own writer when that is installed,
and progress is logged by a small equivalent of ``ReportProgress``. Only process 0 writes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from clu import metrics
from etils import epath

from simclrv2_jax.checkpoints import workdir as workdir_lib
from simclrv2_jax.train.step import GUARD_METRICS


class _NoWriter:
    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        pass

    def write_hparams(self, hparams: dict[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class _TensorBoardScalars(_NoWriter):
    """Scalars to TensorBoard event files with the ``tensorboard`` package alone (no TensorFlow)."""

    def __init__(self, logdir: str) -> None:
        from tensorboard import summary

        self._writer = summary.Writer(summary.DirectoryOutput(logdir))

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, float(value), int(step))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def make_writer(logdir: str):
    """A metric writer with ``write_scalars``, ``write_hparams``, ``flush`` and ``close``."""
    if jax.process_index() != 0:
        return _NoWriter()
    try:
        from clu import metric_writers
    except ImportError:
        try:
            return _TensorBoardScalars(logdir)
        except ImportError:
            logging.warning("Neither TensorFlow nor tensorboard is installed: no TensorBoard event files.")
            return _NoWriter()
    # TensorBoard only: the loop logs its own one-line summary, clu's LoggingWriter would repeat it.
    return metric_writers.AsyncWriter(metric_writers.SummaryWriter(logdir))


class _ReportProgress:
    """Every ``every_steps`` steps: steps/s, percent done and ETA in the log, steps/s to the writer."""

    def __init__(self, num_train_steps: int, writer, every_steps: int) -> None:
        self.total, self.writer, self.every = num_train_steps, writer, every_steps
        self._last: tuple[int, float] | None = None

    def __call__(self, step: int) -> None:
        now = time.time()
        if self._last is None:
            self._last = (step, now)
            return
        if step % self.every and step != self.total:
            return
        last_step, last_time = self._last
        rate = (step - last_step) / max(now - last_time, 1e-9)
        self._last = (step, now)
        eta_min = (self.total - step) / rate / 60 if rate > 0 else float("inf")
        logging.info(
            "%.3g steps/s, %.1f%% (%d/%d), ETA: %.0fm",
            rate,
            100 * step / self.total,
            step,
            self.total,
            eta_min,
        )
        self.writer.write_scalars(step, {"steps_per_sec": rate})


def progress_hooks(
    *, num_train_steps: int, writer, every_steps: int, profile: bool, logdir: str, start_step: int
) -> list[Callable[[int], None]]:
    """Hooks called after every step: progress reports and, if asked, a profiler trace of 5 steps."""
    try:
        from clu import periodic_actions
    except ImportError:
        if profile:
            logging.warning("profile=True needs clu's periodic actions, which need TensorFlow: no trace.")
        return [_ReportProgress(num_train_steps, writer, every_steps)]
    hooks: list[Callable[[int], None]] = [
        periodic_actions.ReportProgress(
            num_train_steps=num_train_steps, writer=writer, every_steps=every_steps
        )
    ]
    if profile and jax.process_index() == 0:
        hooks.append(
            periodic_actions.Profile(logdir=logdir, num_profile_steps=5, first_profile=start_step + 10)
        )
    return hooks


def average(collected: list[dict[str, jax.Array]]) -> dict[str, float]:
    """Mean of each metric over the applied steps of the logged interval, with clu's Average.

    Steps the guard skipped (non-finite) are left out, and so are the guard's own flags.
    """
    rows = [
        {k: v for k, v in values.items() if k not in GUARD_METRICS}
        for values in jax.device_get(collected)
        if not values.get("nonfinite", 0.0)
    ]
    if not rows:
        return {}
    collection = metrics.Collection.create(**{k: metrics.Average.from_output(k) for k in rows[0]})
    merged = None
    for values in rows:
        batch = collection.single_from_model_output(**{k: np.asarray(v) for k, v in values.items()})
        merged = batch if merged is None else merged.merge(batch)
    return {k: float(v) for k, v in merged.compute().items()}


class History:
    """``history.jsonl``: one JSON line per logged step, what the pipeline plots.

    Rewritten whole on every log (object stores such as gs:// cannot append); lines of steps after the
    resumed step are dropped, so a resumed run does not repeat them.
    """

    def __init__(self, path: epath.Path, start_step: int) -> None:
        self.path = path
        self.rows: list[str] = []
        if path.exists():
            self.rows = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= start_step
            ]

    def add(self, step: int, record: dict[str, Any]) -> None:
        if jax.process_index() != 0:
            return
        self.rows.append(json.dumps({"step": step, **record}))
        self.path.write_text("\n".join(self.rows) + "\n")


class Outputs:
    """Where a run reports: TensorBoard, ``history.jsonl``, progress lines, and the JSON files."""

    def __init__(self, workdir: str, config, *, start_step: int, total: int) -> None:
        self.path = workdir_lib.prepare(workdir)
        self.writer = make_writer(workdir)
        if start_step == 0:
            self.writer.write_hparams(
                {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))}
            )
        self.hooks = progress_hooks(
            num_train_steps=total,
            writer=self.writer,
            every_steps=config.log_every_steps,
            profile=config.get("profile", False),
            logdir=workdir,
            start_step=start_step,
        )
        self.history = History(self.path / "history.jsonl", start_step)

    def after_step(self, step: int) -> None:
        for hook in self.hooks:
            hook(step)

    def record(self, step: int, record: dict[str, Any]) -> None:
        self.writer.write_scalars(step, record)
        self.history.add(step, record)

    def write_json(self, name: str, payload: dict) -> None:
        write_json(self.path / name, payload)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def write_json(path: epath.Path, payload: dict) -> None:
    if jax.process_index() == 0:
        path.write_text(json.dumps(payload, indent=2, sort_keys=True))
