"""The one training loop every stage shares: steps, evaluation, checkpoints, metrics, progress.

* Resume: if the workdir holds a checkpoint the run continues from the newest one that loads
  (damaged ones are moved aside, see ``checkpoints.py``), after checking that its config is the
  checkpoint's (``workdir.check_resume``); else it starts fresh (and ``task.initialize`` loads the
  previous stage). Data position and RNG are functions of the step, so the resumed run is
  bit-for-bit the uninterrupted one.
* Divergence: the step's guard (``step.guarded_update``) never applies a non-finite step; the loop
  reads its flags one step behind (free: it waits for that step anyway) and synchronously before
  anything uses the state. A halted run saves its last finite state and raises ``TrainingDiverged``.
* Stopping: SIGTERM or Ctrl-C (``StopSignals``) finishes the current step (or evaluation batch),
  saves a checkpoint of the last completed step and raises ``Interrupted`` saying what was saved.
  The final checkpoint is saved before the final evaluation. A crash loses at most
  ``checkpoint_steps`` steps; the save under way completes first.
* Output in the workdir: TensorBoard events, ``history.jsonl`` (one line per logged step, what the
  pipeline plots, plus a line per accepted resume change), ``config.json``, ``checkpoints/``, and
  ``results.json`` at the end.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metrics
from etils import epath
from jax.sharding import Mesh

from simclrv2_jax import parallel
from simclrv2_jax import workdir as workdir_lib
from simclrv2_jax.checkpoints import Checkpointer
from simclrv2_jax.data.array_pipeline import global_iterator
from simclrv2_jax.train import reporting
from simclrv2_jax.train.state import TrainState
from simclrv2_jax.train.step import GUARD_METRICS, nonfinite_parts
from simclrv2_jax.train.task import Task


class Interrupted(KeyboardInterrupt):
    """The run stopped on request (SIGTERM, Ctrl-C); ``message`` says what was saved."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.message = message
        self.signum = signum


class TrainingDiverged(FloatingPointError):
    """A step was non-finite past ``skip_nonfinite_steps``; the last finite state is saved."""


class StopSignals:
    """SIGTERM and Ctrl-C become a request that the loop honours at the next safe point.

    The loop checks ``requested`` after each step and between evaluation batches, saves the last
    completed step and raises ``Interrupted``. A second Ctrl-C raises ``KeyboardInterrupt`` at once
    (nothing more is saved). Outside the main thread signals cannot be caught and this does nothing.
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


class _EvalInterrupted(Exception):
    pass


def _average(collected: list[dict[str, jax.Array]]) -> dict[str, float]:
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


def eval_totals(
    batches: Iterable,
    state: Any,
    eval_fn: Callable,
    sharding,
    stop: StopSignals | None = None,
    extra: tuple = (),
) -> dict[str, float]:
    """The eval step's sums over ``batches`` (one full pass over the eval split), ``count`` included:
    exact over the split thanks to the padding mask.

    Stops between batches (``_EvalInterrupted``) when ``stop`` has a request.
    """
    totals: dict[str, jax.Array] | None = None
    for batch in global_iterator(batches, sharding):
        if stop is not None and stop.requested:
            raise _EvalInterrupted
        sums = eval_fn(state, batch, *extra)
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    return {} if totals is None else {k: float(v) for k, v in jax.device_get(totals).items()}


def evaluate(
    task: Task, state: TrainState, eval_fn: Callable, sharding, stop: StopSignals | None = None
) -> dict[str, float]:
    """The task's eval metrics (sums divided by the example count) over its eval split."""
    totals = eval_totals(task.eval_data(), state, eval_fn, sharding, stop, task.extra)
    if not totals:
        return {}
    count = max(totals.pop("count"), 1.0)
    return {k: v / count for k, v in totals.items()}


def _write_json(path: epath.Path, payload: dict) -> None:
    if jax.process_index() == 0:
        path.write_text(json.dumps(payload, indent=2, sort_keys=True))


class _History:
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

    def add(self, step: int, record: dict[str, float]) -> None:
        if jax.process_index() != 0:
            return
        self.rows.append(json.dumps({"step": step, **record}))
        self.path.write_text("\n".join(self.rows) + "\n")


def _guard_flags(step_metrics: dict[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get({k: step_metrics[k] for k in GUARD_METRICS}).items()}


def _suggested_learning_rate(config) -> str:
    return f"{config.learning_rate / 10:g}"


# The initial state is computed once, and its program is mostly the threefry bits of the initialisers:
# on the CPU, LLVM's optimisation of that program took 4x its compile time (39 s -> 10 s for the
# tests' tiny ResNet) and saves nothing measurable when it runs once. The values differ from the
# optimised program's by float rounding of the initialisers (about 1e-7), not in distribution.
CPU_QUICK_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compile_init(init: Callable[[], TrainState], shardings: Any) -> Callable[[], TrainState]:
    """``init`` jitted onto ``shardings``; compiled without LLVM optimisation on the CPU backend."""
    jitted = jax.jit(init, out_shardings=shardings)
    if jax.default_backend() != "cpu":
        return jitted
    return jitted.lower().compile(compiler_options=CPU_QUICK_COMPILE)


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
    workdir_path = workdir_lib.prepare(workdir)
    rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    max_skipped = int(config.get("skip_nonfinite_steps", 0))

    def init() -> TrainState:
        return task.init_state(config.seed)

    abstract = jax.eval_shape(init)
    layout = parallel.ParamLayout(
        mesh, config.get("param_sharding", "replicated"), config.get("fsdp_min_size", 2**14)
    )
    state_sharding = layout.state_shardings(abstract)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding
    )

    checkpointer = Checkpointer(
        workdir, max_to_keep=config.keep_checkpoint_max, save_interval_steps=config.checkpoint_steps
    )
    changes: dict[str, tuple[Any, Any]] = {}

    def check_config(saved: dict | None, path) -> None:
        changes.clear()
        changes.update(workdir_lib.check_resume(saved, config, str(path)))

    try:
        restored = checkpointer.restore_latest(abstract, check_config)
    except BaseException:
        checkpointer.close()
        raise
    if restored is not None:
        state, latest, _ = restored
        logging.info("Resuming %s from the checkpoint at step %d in %s", task.name, latest, workdir)
    else:
        state = compile_init(init, state_sharding)()
        if task.initialize is not None:
            state = jax.device_put(task.initialize(state, task.tx), state_sharding)
    if restored is None or changes:
        _write_json(workdir_path / "config.json", config.to_dict())
    start_step = int(jax.device_get(state.step))
    total = task.total_steps

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

    writer = reporting.make_writer(workdir)
    if start_step == 0:
        writer.write_hparams(
            {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))}
        )
    hooks = reporting.progress_hooks(
        num_train_steps=total,
        writer=writer,
        every_steps=config.log_every_steps,
        profile=config.get("profile", False),
        logdir=workdir,
        start_step=start_step,
    )
    history = _History(workdir_path / "history.jsonl", start_step)
    if changes:
        logging.warning(
            "%s resumes at step %d with changed optimisation fields (recorded in history.jsonl): %s",
            task.name,
            start_step,
            {k: f"{a!r} -> {b!r}" for k, (a, b) in changes.items()},
        )
        history.add(
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
    collected: list[dict[str, jax.Array]] = []
    train_summary: dict[str, float] = {}
    eval_summary: dict[str, float] = {}
    skipped = {"total": 0}
    t_start = time.time()
    step = start_step
    inspected = [start_step]  # the steps up to here have had their guard flags read

    def log_record(step: int, record: dict[str, Any]) -> None:
        writer.write_scalars(step, record)
        history.add(step, record)

    def save(state: TrainState, force: bool = False) -> None:
        # Halted states carry the budget one past its end; saved, they carry the budget used.
        state = state.replace(skipped_steps=jnp.minimum(state.skipped_steps, max_skipped))
        checkpointer.save(int(jax.device_get(state.step)), state, config, force=force)

    def inspect(at_step: int, step_metrics: dict[str, jax.Array]) -> None:
        """Reads the guard's flags of step ``at_step``; stops the run if it halted there."""
        if at_step <= inspected[0]:
            return
        inspected[0] = at_step
        flags = _guard_flags(step_metrics)
        skipped["total"] = int(flags["skipped_steps"])
        if flags["halted"]:
            values = {k: float(v) for k, v in jax.device_get(step_metrics).items() if k not in GUARD_METRICS}
            shown = ", ".join(f"{k}={values[k]:.4g}" for k in ("loss", "grad_norm") if k in values)
            save(state, force=True)
            checkpointer.wait_until_finished()
            kept = int(jax.device_get(state.step))
            allowance = (
                f"all {max_skipped} allowed skips were used before it"
                if max_skipped
                else "the run stops at the first such step (config.skip_nonfinite_steps=0)"
            )
            parts = ", ".join(nonfinite_parts(flags["nonfinite_parts"]))
            raise TrainingDiverged(
                f"{task.name} diverged at step {at_step}: non-finite {parts} ({shown}); the step was "
                f"not applied and {allowance}. The last finite state "
                f"(step {kept}) is saved in {checkpointer.path(kept)}. Resume from it with a lower "
                f"learning rate (--config.learning_rate={_suggested_learning_rate(config)} "
                "--config.resume_changes=learning_rate) or let the run skip such steps "
                "(--config.skip_nonfinite_steps=N); if it diverges again at once, the weights were already "
                "ruined before this step: start afresh in a new --workdir."
            )
        if flags["nonfinite"]:
            logging.warning(
                "%s step %d: non-finite %s; the step was skipped (%d of %d allowed).",
                task.name,
                at_step,
                ", ".join(nonfinite_parts(flags["nonfinite_parts"])),
                skipped["total"],
                max_skipped,
            )

    def settle(step_metrics: dict[str, jax.Array] | None) -> None:
        """Waits for the current step and checks it, before its state is saved, evaluated or shown."""
        if step_metrics is not None:
            inspect(step, step_metrics)

    def interrupted(during: str) -> Interrupted:
        if int(jax.device_get(state.step)) > 0:  # a fresh run stopped before its first step saves nothing
            save(state, force=True)
        checkpointer.wait_until_finished()
        saved_step = checkpointer.latest_step()
        where = (
            f"the checkpoint of step {saved_step} is in {checkpointer.path(saved_step)}"
            if saved_step is not None
            else "no step had finished, so there is nothing to save"
        )
        return Interrupted(
            f"{task.name} stopped by {stop.name} {during}; {where}. Run the same command to resume.",
            stop.requested or signal.SIGINT,
        )

    def run_eval(final: bool) -> dict[str, float]:
        try:
            return evaluate(task, state, eval_fn, data, stop)
        except _EvalInterrupted:
            raise interrupted(f"during the {'final ' if final else ''}evaluation at step {step}") from None

    completed = False
    try:
        train_iter = global_iterator(task.train_data(start_step), data)
        last_metrics: dict[str, jax.Array] | None = None
        while step < total:
            if stop.requested:
                settle(last_metrics)
                raise interrupted(f"at step {step}")
            batch = next(train_iter)
            try:
                state, step_metrics = train_fn(state, batch, *task.extra)
                step += 1
                if last_metrics is not None:
                    # At most one step in flight: progress and ETA measure compute, not dispatch, and
                    # the host never queues up an unbounded number of batches. The finished step's
                    # guard flags are read here, for free.
                    jax.block_until_ready(last_metrics)
                    inspect(step - 1, last_metrics)
                last_metrics = step_metrics
                collected.append(step_metrics)
                for hook in hooks:
                    hook(step)
                if step % config.log_every_steps == 0 or step == total:
                    settle(step_metrics)
                    train_summary = _average(collected)
                    collected = []
                    record = {f"train/{k}": v for k, v in train_summary.items()}
                    if skipped["total"]:
                        record["train/skipped_steps"] = float(skipped["total"])
                    log_record(step, record)
                    logging.info(
                        "%s step %d/%d: %s",
                        task.name,
                        step,
                        total,
                        ", ".join(f"{k}={v:.4g}" for k, v in sorted(train_summary.items())),
                    )
                if step % config.checkpoint_steps == 0 and step < total:
                    settle(step_metrics)
                    save(state)
                if eval_fn is not None and config.eval_every_steps and step % config.eval_every_steps == 0:
                    if step < total:
                        settle(step_metrics)
                        eval_summary = run_eval(final=False)
                        log_record(step, {f"eval/{k}": v for k, v in eval_summary.items()})
                        logging.info("%s eval at step %d: %s", task.name, step, eval_summary)
                if step_hooks:
                    settle(step_metrics)
                    for hook in step_hooks:
                        hook(step, state)
            except KeyboardInterrupt as e:
                if isinstance(e, Interrupted) or stop.forced:
                    raise
                # Raised by a hook or by code that does not know about ``stop``: the state is whole.
                stop.requested = stop.requested or signal.SIGINT
                settle(last_metrics)
                raise interrupted(f"at step {step}") from None
        settle(last_metrics)

        # The final checkpoint is written before the final evaluation, so that an interrupt during
        # the evaluation loses no training; a rerun then only evaluates.
        save(state, force=True)
        if stop.requested:
            raise interrupted(f"after the last step ({step})")
        if eval_fn is not None:
            eval_summary = run_eval(final=True)
            log_record(step, {f"eval/{k}": v for k, v in eval_summary.items()})
            logging.info("%s final eval at step %d: %s", task.name, step, eval_summary)
        checkpointer.wait_until_finished()
        completed = True
    finally:
        # Whatever happened, the save under way completes (a run resumes from it) and the logs reach disk.
        try:
            checkpointer.wait_until_finished()
            checkpointer.close()
        finally:
            writer.flush()
            writer.close()
    elapsed = time.time() - t_start
    steps_run = step - start_step
    results = {
        "stage": task.name,
        "final_step": step,
        "total_steps": total,
        "completed": completed and step >= total,
        "train": train_summary,
        "eval": eval_summary,
        "skipped_steps": skipped["total"],
        "wall_time_s": time.time() - t_run,  # this run, set-up and evaluation included
        "train_loop_time_s": elapsed,
        "steps_this_run": steps_run,
        "steps_per_sec": steps_run / elapsed if elapsed > 0 else 0.0,
        "devices": int(mesh.devices.size),
        "augment_on_device": task.augment_on_device,
        **task.info,
    }
    _write_json(workdir_path / "results.json", results)
    results["state"] = state
    return results
