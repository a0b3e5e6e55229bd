"""The one training loop every stage shares: steps, evaluation, checkpoints, metrics, progress.

* Resume: if the workdir holds a checkpoint the run continues from the latest one, else it starts
  fresh (and ``task.initialize`` loads the previous stage). Data position and RNG are functions of
  the step, so the resumed run is bit-for-bit the uninterrupted one.
* Stopping: Ctrl-C or SIGTERM (a preempted VM) finishes the current step, saves a checkpoint and
  exits; any other crash loses at most ``checkpoint_steps`` steps.
* Output in the workdir: TensorBoard events, ``history.jsonl`` (one line per logged step, what the
  pipeline plots), ``config.json``, ``checkpoints/``, and ``results.json`` at the end.
"""

from __future__ import annotations

import json
import math
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
from simclrv2_jax.checkpoints import Checkpointer
from simclrv2_jax.data.array_pipeline import global_iterator
from simclrv2_jax.train import reporting
from simclrv2_jax.train.state import TrainState, create_train_state
from simclrv2_jax.train.task import Task


class _StopRequested:
    """Turns SIGTERM into a flag checked between steps, so the loop can save before exiting."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopRequested:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        logging.warning("SIGTERM received: finishing this step, saving a checkpoint, then stopping.")
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _average(collected: list[dict[str, jax.Array]]) -> dict[str, float]:
    """Mean of each metric over the logged interval, with clu's Average."""
    if not collected:
        return {}
    collection = metrics.Collection.create(**{k: metrics.Average.from_output(k) for k in collected[0]})
    merged = None
    for values in jax.device_get(collected):
        batch = collection.single_from_model_output(**{k: np.asarray(v) for k, v in values.items()})
        merged = batch if merged is None else merged.merge(batch)
    return {k: float(v) for k, v in merged.compute().items()}


def evaluate(task: Task, state: TrainState, eval_fn: Callable, sharding) -> dict[str, float]:
    """One full pass over the eval split; metrics exact over the split thanks to the padding mask."""
    totals: dict[str, jax.Array] | None = None
    for batch in global_iterator(task.eval_data(), sharding):
        sums = eval_fn(state, batch, *task.extra)
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    if totals is None:
        return {}
    totals = jax.device_get(totals)
    count = max(float(totals.pop("count")), 1.0)
    return {k: float(v) / count for k, v in totals.items()}


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


def run(
    task: Task,
    workdir: str,
    *,
    mesh: Mesh | None = None,
    step_hooks: Iterable[Callable[[int, TrainState], None]] = (),
) -> dict[str, Any]:
    """Trains ``task`` in ``workdir`` to ``task.total_steps``; returns what results.json holds."""
    t_run = time.time()
    config = task.config
    mesh = mesh or parallel.create_mesh()
    parallel.local_batch_size(config.train_batch_size, mesh)
    if task.eval_data is not None:
        parallel.local_batch_size(config.eval_batch_size, mesh, field="eval_batch_size")
    workdir_path = epath.Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)
    rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)

    def init() -> TrainState:
        return create_train_state(task.init_variables, task.tx, config.seed)

    abstract = jax.eval_shape(init)
    state_sharding = jax.tree_util.tree_map(lambda _: rep, abstract)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding
    )

    checkpointer = Checkpointer(
        workdir, max_to_keep=config.keep_checkpoint_max, save_interval_steps=config.checkpoint_steps
    )
    latest = checkpointer.latest_step()
    if latest is not None:
        logging.info("Resuming %s from the checkpoint at step %d in %s", task.name, latest, workdir)
        state = checkpointer.restore(latest, abstract)
    else:
        state = jax.jit(init, out_shardings=state_sharding)()
        if task.initialize is not None:
            state = task.initialize(state, task.tx)
    _write_json(workdir_path / "config.json", config.to_dict())
    start_step = int(jax.device_get(state.step))
    total = task.total_steps

    train_fn = jax.jit(
        task.train_step,
        in_shardings=(state_sharding, data, *task.extra_shardings),
        out_shardings=(state_sharding, rep),
        donate_argnums=(0,),
    )
    eval_fn = None
    if task.eval_step is not None and task.eval_data is not None:
        eval_fn = jax.jit(
            task.eval_step, in_shardings=(state_sharding, data, *task.extra_shardings), out_shardings=rep
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

    logging.info(
        "%s: steps %d -> %d, global batch %d over %d device(s)",
        task.name,
        start_step,
        total,
        config.train_batch_size,
        mesh.devices.size,
    )
    train_iter = global_iterator(task.train_data(start_step), data)
    collected: list[dict[str, jax.Array]] = []
    train_summary: dict[str, float] = {}
    eval_summary: dict[str, float] = {}
    t_start = time.time()
    step = start_step

    def log_record(step: int, record: dict[str, float]) -> None:
        writer.write_scalars(step, record)
        history.add(step, record)

    try:
        with _StopRequested() as stop:
            while step < total:
                batch = next(train_iter)
                state, step_metrics = train_fn(state, batch, *task.extra)
                step += 1
                if collected:
                    # At most one step in flight: progress and ETA measure compute, not dispatch, and
                    # the host never queues up an unbounded number of batches.
                    jax.block_until_ready(collected[-1])
                collected.append(step_metrics)
                for hook in hooks:
                    hook(step)
                if step % config.log_every_steps == 0 or step == total:
                    train_summary = _average(collected)
                    collected = []
                    if not all(math.isfinite(v) for v in train_summary.values()):
                        raise FloatingPointError(
                            f"{task.name}: non-finite training metrics at step {step}: {train_summary}. "
                            "Lower --config.learning_rate or check the data; the last good checkpoint "
                            f"is kept in {checkpointer.directory}."
                        )
                    log_record(step, {f"train/{k}": v for k, v in train_summary.items()})
                    logging.info(
                        "%s step %d/%d: %s",
                        task.name,
                        step,
                        total,
                        ", ".join(f"{k}={v:.4g}" for k, v in sorted(train_summary.items())),
                    )
                if step % config.checkpoint_steps == 0 and step < total:
                    checkpointer.save(step, state, config)
                if (
                    eval_fn is not None
                    and config.eval_every_steps
                    and step % config.eval_every_steps == 0
                    and step < total
                ):
                    eval_summary = evaluate(task, state, eval_fn, data)
                    log_record(step, {f"eval/{k}": v for k, v in eval_summary.items()})
                    logging.info("%s eval at step %d: %s", task.name, step, eval_summary)
                for hook in step_hooks:
                    hook(step, state)
                if stop.requested:
                    raise KeyboardInterrupt("SIGTERM")
    except KeyboardInterrupt:
        logging.warning("%s interrupted at step %d: saving a checkpoint to resume from.", task.name, step)
        checkpointer.save(step, state, config, force=True)
        checkpointer.wait_until_finished()
        checkpointer.close()
        writer.flush()
        raise
    except BaseException:
        # A crash: let the periodic save already under way finish, so the run can resume from it.
        checkpointer.wait_until_finished()
        checkpointer.close()
        raise

    if eval_fn is not None:
        eval_summary = evaluate(task, state, eval_fn, data)
        log_record(step, {f"eval/{k}": v for k, v in eval_summary.items()})
        logging.info("%s final eval at step %d: %s", task.name, step, eval_summary)
    if checkpointer.latest_step() != step:
        checkpointer.save(step, state, config, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()
    writer.flush()
    writer.close()
    elapsed = time.time() - t_start
    steps_run = step - start_step
    results = {
        "stage": task.name,
        "final_step": step,
        "total_steps": total,
        "completed": step >= total,
        "train": train_summary,
        "eval": eval_summary,
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
