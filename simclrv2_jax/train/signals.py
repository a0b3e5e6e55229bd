"""SIGTERM and Ctrl-C as a request the training loop honours at its next safe point.

A preempted VM gets SIGTERM; a user presses Ctrl-C. Either way the loop finishes the current step
(or evaluation batch), saves a checkpoint of the last completed step and raises ``Interrupted``
saying what was saved. A second Ctrl-C raises ``KeyboardInterrupt`` at once (nothing more is saved).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from absl import logging


class Interrupted(KeyboardInterrupt):
    """The run stopped on request (SIGTERM, Ctrl-C); ``message`` says what was saved."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.message = message
        self.signum = signum


class StopSignals:
    """A context manager: while inside, SIGTERM and SIGINT set ``requested`` instead of stopping.

    ``requested`` is the signal number asked for (None: none yet); ``forced`` tells that a second
    Ctrl-C stopped the process at once. Outside the main thread signals cannot be caught and this
    does nothing.
    """

    def __init__(self) -> None:
        self.requested: int | None = None
        self.forced = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            self.forced = True
            raise KeyboardInterrupt("second Ctrl-C: stopping at once")
        self.requested = signum
        logging.warning(
            "%s received: finishing the current step, saving a checkpoint, then stopping "
            "(Ctrl-C again stops at once).",
            signal.Signals(signum).name,
        )

    @property
    def name(self) -> str:
        return signal.Signals(self.requested).name if self.requested else "an interrupt"

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
