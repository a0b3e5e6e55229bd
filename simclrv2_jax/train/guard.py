"""Reading the finite-state guard's flags one step behind, and the message of a diverged run.

The guard itself runs on the device inside the step (``step.guarded_update``); each step's metrics
carry its flags. ``Guard.read`` takes them once per step, in step order, so the loop can read a step's
flags while the next step runs.
"""

from __future__ import annotations

import dataclasses

import jax

from simclrv2_jax.config import flag
from simclrv2_jax.train.step import GUARD_METRICS, nonfinite_parts


@dataclasses.dataclass
class GuardReport:
    """What the guard's flags of one step say."""

    step: int
    halted: bool
    nonfinite: bool
    parts: list[str]
    skipped: int  # skipped steps so far
    values: dict[str, float]  # the step's other metrics (for the message)


class Guard:
    """Reads the finite-state guard's flags of each step once, in step order."""

    def __init__(self, start_step: int, max_skipped: int) -> None:
        self.inspected = start_step  # the steps up to here have had their flags read
        self.max_skipped = max_skipped
        self.skipped = 0

    def read(self, at_step: int, step_metrics: dict[str, jax.Array]) -> GuardReport | None:
        """The report of step ``at_step`` (waiting for it), or None when it was already read."""
        if at_step <= self.inspected:
            return None
        self.inspected = at_step
        flags = {k: float(v) for k, v in jax.device_get({k: step_metrics[k] for k in GUARD_METRICS}).items()}
        self.skipped = int(flags["skipped_steps"])
        values = {}
        if flags["halted"]:
            values = {k: float(v) for k, v in jax.device_get(step_metrics).items() if k not in GUARD_METRICS}
        return GuardReport(
            step=at_step,
            halted=bool(flags["halted"]),
            nonfinite=bool(flags["nonfinite"]),
            parts=nonfinite_parts(flags["nonfinite_parts"]),
            skipped=self.skipped,
            values=values,
        )

    def divergence_message(self, name: str, report: GuardReport, kept_step: int, where, config) -> str:
        shown = ", ".join(f"{k}={report.values[k]:.4g}" for k in ("loss", "grad_norm") if k in report.values)
        allowance = (
            f"all {self.max_skipped} allowed skips were used before it"
            if self.max_skipped
            else "the run stops at the first such step (config.skip_nonfinite_steps=0)"
        )
        return (
            f"{name} diverged at step {report.step}: non-finite {', '.join(report.parts)} ({shown}); "
            f"the step was not applied and {allowance}. The last finite state (step {kept_step}) is saved in "
            f"{where}. Resume from it with a lower learning rate ({flag('learning_rate')}="
            f"{config.learning_rate / 10:g} {flag('resume_changes')}=learning_rate) or let the run skip "
            f"such steps ({flag('skip_nonfinite_steps')}=N); if it diverges again at once, the weights were "
            "already ruined before this step: start afresh in a new --workdir."
        )
