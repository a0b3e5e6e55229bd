"""Where training reports go: TensorBoard scalars and progress lines (steps/s, ETA).

With TensorFlow installed this is clu's (``AsyncWriter(SummaryWriter)``, ``ReportProgress``,
``Profile``). clu's writers and periodic actions import TensorFlow, so where it is absent (an
accelerator host training on in-memory data with augmentation on the device) the same scalars go to
TensorBoard event files through the ``tensorboard`` package's own writer when that is installed,
and progress is logged by a small equivalent of ``ReportProgress``. Only process 0 writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
from absl import logging


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
