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

from simclrv2_jax.checkpoints import Checkpointer, lineage
from simclrv2_jax.checkpoints import workdir as workdir_lib
from simclrv2_jax.config import flag
from simclrv2_jax.config.validation import resume_change_names
from simclrv2_jax.data.array_pipeline import global_iterator
from simclrv2_jax.data.folders import BadImageError
from simclrv2_jax.train import microbatches, parallel
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
    """``(state, state_sharding, changes, record)``: the newest checkpoint that loads (its config and
    its inputs checked against the task's), else a fresh state initialised from the earlier stage.
    ``record`` is the run's ``run.json`` (``checkpoints.lineage``), written here for a fresh run;
    ``changes`` is empty for a fresh run."""
    config = task.config

    def init() -> TrainState:
        return task.init_state(config.seed)

    abstract = jax.eval_shape(init)
    state_sharding = layout.state_shardings(abstract)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding
    )
    now = {role: lineage.describe(path, flag(field)) for role, (path, field) in task.inputs.items()}
    record = lineage.read(workdir)
    changes: dict[str, tuple[Any, Any]] = {}

    def check_config(saved: dict | None, path) -> None:
        changes.clear()
        changes.update(workdir_lib.check_resume(_inputs_as_now(saved, task, record, now), config, str(path)))

    restored = checkpointer.restore_latest(abstract, check_config)
    if restored is not None:
        state, latest, _ = restored
        logging.info("Resuming %s from the checkpoint at step %d in %s", task.name, latest, workdir)
        return state, state_sharding, changes, _resumed_record(task, workdir, record, now)
    state = compile_init(init, state_sharding)()
    if task.initialize is not None:
        state = jax.device_put(task.initialize(state, task.tx), state_sharding)
    return (
        state,
        state_sharding,
        changes,
        lineage.create(workdir, now, class_names=task.info.get("class_names")),
    )


def _inputs_as_now(saved: dict | None, task: Task, record: dict | None, now: dict) -> dict | None:
    """The checkpoint's config with each input path that names the same input as now (a moved or
    copied run, a path spelled otherwise) replaced by today's spelling: that is no change."""
    if not saved or not record:
        return saved
    saved = dict(saved)
    for role, (path, field) in task.inputs.items():
        if saved.get(field) != path and lineage.same(record.get("inputs", {}).get(role), now[role]):
            saved[field] = path
    return saved


def _resumed_record(task: Task, workdir: str, record: dict | None, now: dict) -> dict:
    """The run record of a resumed run, after refusing an input that changed since the run started
    (another teacher, or the teacher trained on) unless its field is named in ``resume_changes``."""
    if record is None:  # a run of an earlier version: what it reads now is what it started from
        return lineage.create(workdir, now, class_names=task.info.get("class_names"))
    named = resume_change_names(task.config)
    updated = False
    for role, (path, field) in task.inputs.items():
        recorded = record.get("inputs", {}).get(role)
        if role == "checkpoint" or recorded is None or lineage.same(recorded, now[role]):
            continue  # the initial checkpoint is read only when a run starts fresh
        if field not in named:
            raise ValueError(
                f"The {role} this run started with ({recorded.get('path')} at step {recorded.get('step')}) "
                f"is not what {flag(field)}={path} is now ({now[role]['path']} at step {now[role]['step']}): "
                f"resuming would go on with another {role}. To go on with it, name the change: "
                f"{flag('resume_changes')}={field}; or start afresh in a new --workdir."
            )
        record["inputs"][role] = now[role]
        updated = True
    if updated:
        lineage.write(workdir, record)
    return record


class _Training:
    """One invocation of ``run``: the state and step, and what is done between steps."""

    def __init__(self, task: Task, checkpointer: Checkpointer, stop: StopSignals, start_step: int) -> None:
        self.task, self.checkpointer, self.stop = task, checkpointer, stop
        self.max_skipped = int(task.config.get("skip_nonfinite_steps", 0))
        self.guard = Guard(start_step, self.max_skipped)
        self.state: TrainState | None = None
        self.step = start_step
        self.last_metrics: dict[str, jax.Array] | None = None
        self.pending_changes: dict[str, tuple[Any, Any]] = {}  # resume changes not yet recorded
        self.knn = None  # the task's k-NN monitor, when it has one

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

    def evaluate(self, eval_fn: Callable | None, sharding, final: bool) -> dict[str, float]:
        """The eval step's metrics and the k-NN monitor's (``knn_top1``), whichever the task has."""
        try:
            metrics = evaluate(self.task, self.state, eval_fn, sharding, self.stop) if eval_fn else {}
            if self.knn is not None:
                should_stop = lambda: bool(self.stop.requested)  # noqa: E731
                metrics.update(self.knn(self.state.params, self.state.batch_stats, should_stop))
            return metrics
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
    microbatches.check_batch(config.train_batch_size, mesh.devices.size, config.get("microbatches", 1))
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
        state, state_sharding, changes, record = restore_or_init(task, checkpointer, layout, workdir)
        start_step, total = int(jax.device_get(state.step)), task.total_steps
        if changes and start_step >= total:
            names = ",".join(changes)
            raise ValueError(
                f"{task.name} in {workdir} has already finished (step {start_step} of {total}): changing "
                f"{names} now would train nothing and only relabel the run. To train on under the new "
                f"values, lengthen the run too ({flag('train_steps')}=N {flag('resume_changes')}={names},"
                "train_steps), or use a new --workdir."
            )
    except BaseException:
        checkpointer.close()
        raise
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
    if start_step == 0:
        outputs.write_json("config.json", config.to_dict())
    if changes:
        logging.warning(
            "%s resumes at step %d with changed optimisation fields (recorded in history.jsonl; "
            "config.json takes them once a step has run under them): %s",
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
    training.pending_changes = changes
    if task.knn is not None:
        training.knn = task.knn(gather=layout.gather)
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
        if eval_fn is not None or training.knn is not None:
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
        **({"knn_time_s": training.knn.last_time_s} if training.knn is not None else {}),
        **task.info,
        **(task.data_info() if task.data_info else {}),
        **_input_fields(record),
    }
    outputs.write_json("results.json", results)
    results["state"] = training.state
    return results


def _input_fields(record: dict) -> dict[str, Any]:
    """What results.json says the run was built from: its id and, per input, the path and step."""
    inputs = record.get("inputs", {})
    fields: dict[str, Any] = {"run_id": record.get("run_id"), "inputs": inputs}
    for role, prefix in (("checkpoint", "init_checkpoint"), ("teacher", "teacher_checkpoint")):
        if role in inputs:
            fields[prefix] = inputs[role]["path"]
            fields[f"{prefix}_step"] = inputs[role]["step"]
    return fields


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
        try:
            batch = next(train_iter)
        except BadImageError:
            # The data stops the run: keep what it trained (a rerun resumes once the file is fixed
            # or skipped), then the one-line error.
            training.settle()
            if training.step > 0:
                training.save(force=True)
            training.checkpointer.wait_until_finished()
            raise
        try:
            step_metrics = training.train_step(train_fn, batch)
            step = training.step
            if training.pending_changes:
                # The run's config changes only once a step has run under the new values.
                training.settle()
                outputs.write_json("config.json", task.config.to_dict())
                training.pending_changes = {}
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
            if (eval_fn is not None or training.knn is not None) and cadence.evaluate(step):
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
