"""The one training loop every stage shares: steps, evaluation, checkpoints, metrics, progress.

* Resume: if the workdir holds a checkpoint the run continues from the newest one that loads
  (damaged ones are moved aside, see ``checkpoints/manager.py``), after checking that its config is
  the checkpoint's (``workdir.check_resume``); else it starts fresh (and ``task.initialize`` loads the
  previous stage). Data position and RNG are functions of the step, so the resumed run is
  bit-for-bit the uninterrupted one.
* Divergence: the step's guard (``step.guarded_update``) never applies a non-finite step; ``Guard``
  reads its flags one step behind (free: the loop waits for that step anyway) and synchronously
  before anything uses the state. A halted run saves its last finite state and raises
  ``TrainingDiverged``.
* Stopping: SIGTERM or Ctrl-C (``signals.StopSignals``) finishes the current step (or evaluation
  batch), saves a checkpoint of the last completed step and raises ``Interrupted`` saying what was
  saved. The final checkpoint is saved before the final evaluation. A crash loses at most
  ``checkpoint_steps`` steps; the save under way completes first.
* Cadence (``Cadence``): log every ``log_every_steps`` and at the end, save every
  ``checkpoint_steps`` and at the end, evaluate every ``eval_every_steps`` and at the end.
* Output (``Outputs``) in the workdir: TensorBoard events, ``history.jsonl`` (one line per logged
  step, what the pipeline plots, plus a line per accepted resume change), ``config.json``,
  ``checkpoints/``, and ``results.json`` at the end.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import Mesh

from simclrv2_jax.checkpoints import Checkpointer
from simclrv2_jax.checkpoints import workdir as workdir_lib
from simclrv2_jax.data.array_pipeline import global_iterator
from simclrv2_jax.train import parallel
from simclrv2_jax.train.evaluation import EvalInterrupted, eval_totals, mean_metrics
from simclrv2_jax.train.guard import Guard
from simclrv2_jax.train.reporting import Outputs, average
from simclrv2_jax.train.signals import Interrupted, StopSignals
from simclrv2_jax.train.state import TrainState
from simclrv2_jax.train.task import Task

__all__ = ["Interrupted", "StopSignals", "TrainingDiverged", "run"]


class TrainingDiverged(FloatingPointError):
    """A step was non-finite past ``skip_nonfinite_steps``; the last finite state is saved."""


def evaluate(
    task: Task, state: TrainState, eval_fn: Callable, sharding, stop: StopSignals | None = None
) -> dict[str, float]:
    """The task's eval metrics (sums divided by the example count) over its eval split.

    Raises ``EvalInterrupted`` between batches when ``stop`` has a request.
    """
    should_stop = (lambda: bool(stop.requested)) if stop is not None else None
    return mean_metrics(eval_totals(task.eval_data(), state, eval_fn, sharding, should_stop, task.extra))


# ---------------------------------------------------------------------------------------------------
# The parts of a run.


@dataclasses.dataclass(frozen=True)
class Cadence:
    """When the loop logs, saves and evaluates: every so many steps, and always at the last step."""

    total: int
    log_every: int
    checkpoint_every: int
    eval_every: int  # 0: only at the end

    @classmethod
    def of(cls, config, total: int) -> Cadence:
        return cls(total, config.log_every_steps, config.checkpoint_steps, config.eval_every_steps)

    def log(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total

    def save(self, step: int) -> bool:
        """A periodic save (the last step's save is the final one, made apart)."""
        return step % self.checkpoint_every == 0 and step < self.total

    def evaluate(self, step: int) -> bool:
        """A periodic evaluation (the final one is made apart, after the final save)."""
        return bool(self.eval_every) and step % self.eval_every == 0 and step < self.total


# The initial state is computed once, and its program is mostly the threefry bits of the initialisers:
# on the CPU, LLVM's optimisation of that program costs several times its compile time and saves
# nothing measurable when it runs once. The values differ from the optimised program's by float
# rounding of the initialisers (about 1e-7), not in distribution.
CPU_QUICK_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compile_init(init: Callable[[], TrainState], shardings: Any) -> Callable[[], TrainState]:
    """``init`` jitted onto ``shardings``; compiled without LLVM optimisation on the CPU backend."""
    jitted = jax.jit(init, out_shardings=shardings)
    if jax.default_backend() != "cpu":
        return jitted
    return jitted.lower().compile(compiler_options=CPU_QUICK_COMPILE)


def restore_or_init(task: Task, checkpointer: Checkpointer, layout, workdir: str):
    """``(state, state_sharding, changes, resumed)``: the newest checkpoint that loads (its config
    checked against the task's), else a fresh state initialised from the earlier stage."""
    config = task.config

    def init() -> TrainState:
        return task.init_state(config.seed)

    abstract = jax.eval_shape(init)
    state_sharding = layout.state_shardings(abstract)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding
    )
    changes: dict[str, tuple[Any, Any]] = {}

    def check_config(saved: dict | None, path) -> None:
        changes.clear()
        changes.update(workdir_lib.check_resume(saved, config, str(path)))

    restored = checkpointer.restore_latest(abstract, check_config)
    if restored is not None:
        state, latest, _ = restored
        logging.info("Resuming %s from the checkpoint at step %d in %s", task.name, latest, workdir)
        return state, state_sharding, changes, True
    state = compile_init(init, state_sharding)()
    if task.initialize is not None:
        state = jax.device_put(task.initialize(state, task.tx), state_sharding)
    return state, state_sharding, changes, False


class _Training:
    """One invocation of ``run``: the state and step, and what is done between steps."""

    def __init__(self, task: Task, checkpointer: Checkpointer, stop: StopSignals, start_step: int) -> None:
        self.task, self.checkpointer, self.stop = task, checkpointer, stop
        self.max_skipped = int(task.config.get("skip_nonfinite_steps", 0))
        self.guard = Guard(start_step, self.max_skipped)
        self.state: TrainState | None = None
        self.step = start_step
        self.last_metrics: dict[str, jax.Array] | None = None

    def save(self, force: bool = False) -> None:
        # Halted states carry the budget one past its end; saved, they carry the budget used.
        state = self.state.replace(skipped_steps=jnp.minimum(self.state.skipped_steps, self.max_skipped))
        self.checkpointer.save(int(jax.device_get(state.step)), state, self.task.config, force=force)

    def inspect(self, at_step: int, step_metrics: dict[str, jax.Array]) -> None:
        """Reads the guard's flags of step ``at_step``; stops the run if it halted there."""
        report = self.guard.read(at_step, step_metrics)
        if report is None:
            return
        if report.halted:
            self.save(force=True)
            self.checkpointer.wait_until_finished()
            kept = int(jax.device_get(self.state.step))
            where = self.checkpointer.path(kept)
            raise TrainingDiverged(
                self.guard.divergence_message(self.task.name, report, kept, where, self.task.config)
            )
        if report.nonfinite:
            logging.warning(
                "%s step %d: non-finite %s; the step was skipped (%d of %d allowed).",
                self.task.name,
                at_step,
                ", ".join(report.parts),
                report.skipped,
                self.max_skipped,
            )

    def settle(self) -> None:
        """Waits for the current step and checks it, before its state is saved, evaluated or shown."""
        if self.last_metrics is not None:
            self.inspect(self.step, self.last_metrics)

    def interrupted(self, during: str) -> Interrupted:
        if (
            int(jax.device_get(self.state.step)) > 0
        ):  # a fresh run stopped before its first step saves nothing
            self.save(force=True)
        self.checkpointer.wait_until_finished()
        saved_step = self.checkpointer.latest_step()
        where = (
            f"the checkpoint of step {saved_step} is in {self.checkpointer.path(saved_step)}"
            if saved_step is not None
            else "no step had finished, so there is nothing to save"
        )
        return Interrupted(
            f"{self.task.name} stopped by {self.stop.name} {during}; {where}. "
            "Run the same command to resume.",
            self.stop.requested or signal.SIGINT,
        )

    def train_step(self, train_fn: Callable, batch: dict) -> dict[str, jax.Array]:
        """One step, with at most one step in flight: progress and ETA measure compute, not
        dispatch, and the host never queues up an unbounded number of batches. The previous step's
        guard flags are read while this one runs, for free."""
        self.state, step_metrics = train_fn(self.state, batch, *self.task.extra)
        self.step += 1
        if self.last_metrics is not None:
            jax.block_until_ready(self.last_metrics)
            self.inspect(self.step - 1, self.last_metrics)
        self.last_metrics = step_metrics
        return step_metrics

    def evaluate(self, eval_fn: Callable, sharding, final: bool) -> dict[str, float]:
        try:
            return evaluate(self.task, self.state, eval_fn, sharding, self.stop)
        except EvalInterrupted:
            during = f"during the {'final ' if final else ''}evaluation at step {self.step}"
            raise self.interrupted(during) from None


def run(
    task: Task,
    workdir: str,
    *,
    mesh: Mesh | None = None,
    step_hooks: Iterable[Callable[[int, TrainState], None]] = (),
    stop: StopSignals | None = None,
) -> dict[str, Any]:
    """Trains ``task`` in ``workdir`` to ``task.total_steps``; returns what results.json holds.

    ``stop`` carries SIGTERM/Ctrl-C requests (``train_stage`` installs it before building the task);
    without one the loop installs its own.
    """
    if stop is None:
        with StopSignals() as own_stop:
            return run(task, workdir, mesh=mesh, step_hooks=step_hooks, stop=own_stop)
    t_run = time.time()
    config = task.config
    mesh = mesh or parallel.create_mesh()
    parallel.local_batch_size(config.train_batch_size, mesh)
    if task.eval_data is not None:
        parallel.local_batch_size(config.eval_batch_size, mesh, field="eval_batch_size")
    workdir_lib.prepare(workdir)
    rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    layout = parallel.ParamLayout(
        mesh, config.get("param_sharding", "replicated"), config.get("fsdp_min_size", 2**14)
    )
    checkpointer = Checkpointer(
        workdir, max_to_keep=config.keep_checkpoint_max, save_interval_steps=config.checkpoint_steps
    )
    try:
        state, state_sharding, changes, resumed = restore_or_init(task, checkpointer, layout, workdir)
    except BaseException:
        checkpointer.close()
        raise
    start_step, total = int(jax.device_get(state.step)), task.total_steps
    train_fn = jax.jit(
        task.make_train_step(layout),
        in_shardings=(state_sharding, data, *task.extra_shardings),
        out_shardings=(state_sharding, rep),
        donate_argnums=(0,),
    )
    eval_fn = None
    if task.eval_step is not None and task.eval_data is not None:
        eval_fn = jax.jit(
            task.make_eval_step(layout),
            in_shardings=(state_sharding, data, *task.extra_shardings),
            out_shardings=rep,
        )
    outputs = Outputs(workdir, config, start_step=start_step, total=total)
    if not resumed or changes:
        outputs.write_json("config.json", config.to_dict())
    if changes:
        logging.warning(
            "%s resumes at step %d with changed optimisation fields (recorded in history.jsonl): %s",
            task.name,
            start_step,
            {k: f"{a!r} -> {b!r}" for k, (a, b) in changes.items()},
        )
        outputs.history.add(
            start_step, {"event": "resume_changes", "changes": {k: list(v) for k, v in changes.items()}}
        )
    logging.info(
        "%s: steps %d -> %d, global batch %d over %d device(s)",
        task.name,
        start_step,
        total,
        config.train_batch_size,
        mesh.devices.size,
    )
    training = _Training(task, checkpointer, stop, start_step)
    training.state = state
    cadence = Cadence.of(config, total)
    summaries = {"train": {}, "eval": {}}
    t_start = time.time()
    completed = False
    try:
        _train_loop(training, cadence, outputs, train_fn, eval_fn, data, step_hooks, summaries)
        # The final checkpoint is written before the final evaluation, so that an interrupt during
        # the evaluation loses no training; a rerun then only evaluates.
        training.save(force=True)
        if stop.requested:
            raise training.interrupted(f"after the last step ({training.step})")
        if eval_fn is not None:
            summaries["eval"] = training.evaluate(eval_fn, data, final=True)
            outputs.record(training.step, {f"eval/{k}": v for k, v in summaries["eval"].items()})
            logging.info("%s final eval at step %d: %s", task.name, training.step, summaries["eval"])
        checkpointer.wait_until_finished()
        completed = True
    finally:
        # Whatever happened, the save under way completes (a run resumes from it) and the logs reach disk.
        try:
            checkpointer.wait_until_finished()
            checkpointer.close()
        finally:
            outputs.close()
    elapsed = time.time() - t_start
    steps_run = training.step - start_step
    results = {
        "stage": task.name,
        "final_step": training.step,
        "total_steps": total,
        "completed": completed and training.step >= total,
        "train": summaries["train"],
        "eval": summaries["eval"],
        "skipped_steps": training.guard.skipped,
        "wall_time_s": time.time() - t_run,  # this run, set-up and evaluation included
        "train_loop_time_s": elapsed,
        "steps_this_run": steps_run,
        "steps_per_sec": steps_run / elapsed if elapsed > 0 else 0.0,
        "devices": int(mesh.devices.size),
        "augment_on_device": task.augment_on_device,
        **task.info,
    }
    outputs.write_json("results.json", results)
    results["state"] = training.state
    return results


def _train_loop(
    training: _Training,
    cadence: Cadence,
    outputs: Outputs,
    train_fn: Callable,
    eval_fn: Callable | None,
    data_sharding,
    step_hooks: Iterable[Callable[[int, TrainState], None]],
    summaries: dict[str, dict[str, float]],
) -> None:
    """Steps until ``cadence.total``, logging, saving and evaluating on the way (see ``Cadence``)."""
    task, stop = training.task, training.stop
    train_iter = global_iterator(task.train_data(training.step), data_sharding)
    collected: list[dict[str, jax.Array]] = []
    while training.step < cadence.total:
        if stop.requested:
            training.settle()
            raise training.interrupted(f"at step {training.step}")
        batch = next(train_iter)
        try:
            step_metrics = training.train_step(train_fn, batch)
            step = training.step
            collected.append(step_metrics)
            outputs.after_step(step)
            if cadence.log(step):
                training.settle()
                summaries["train"] = average(collected)
                collected = []
                record = {f"train/{k}": v for k, v in summaries["train"].items()}
                if training.guard.skipped:
                    record["train/skipped_steps"] = float(training.guard.skipped)
                outputs.record(step, record)
                shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(summaries["train"].items()))
                logging.info("%s step %d/%d: %s", task.name, step, cadence.total, shown)
            if cadence.save(step):
                training.settle()
                training.save()
            if eval_fn is not None and cadence.evaluate(step):
                training.settle()
                summaries["eval"] = training.evaluate(eval_fn, data_sharding, final=False)
                outputs.record(step, {f"eval/{k}": v for k, v in summaries["eval"].items()})
                logging.info("%s eval at step %d: %s", task.name, step, summaries["eval"])
            if step_hooks:
                training.settle()
                for hook in step_hooks:
                    hook(step, training.state)
        except KeyboardInterrupt as e:
            if isinstance(e, Interrupted) or stop.forced:
                raise
            # Raised by a hook or by code that does not know about ``stop``: the state is whole.
            stop.requested = stop.requested or signal.SIGINT
            training.settle()
            raise training.interrupted(f"at step {training.step}") from None
    training.settle()
