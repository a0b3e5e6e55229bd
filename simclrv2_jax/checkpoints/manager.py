"""Orbax checkpoints: periodic async saves with the config beside them, resume, stage handoff.

Layout of a stage's workdir::

    WORKDIR/checkpoints/<step>/state    the whole TrainState (params, batch_stats, opt_state, rng, step)
    WORKDIR/checkpoints/<step>/config   the run's config as JSON

A later stage reads ``params`` and ``batch_stats`` of an earlier stage's latest checkpoint by name
(``SavedRun.load_variables``); the parts the new model has (backbone, the projection-head layers up to
``ft_proj_selector``) must be present with the same shapes, anything else is ignored.

Nothing non-finite is ever saved, and a resumed run restores the newest checkpoint that loads: one
that fails (a truncated file, a missing ``_METADATA``, deleted data, non-finite values) is reported
with its path and moved aside to ``WORKDIR/checkpoints_set_aside/`` -- never deleted -- and the next
newest is tried. A checkpoint that loads but has another structure than the model (another
architecture, another version's state) is the user's mismatch and stops the run with the
differences listed; it is not moved.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from simclrv2_jax import config as config_lib
from simclrv2_jax.checkpoints.saved_run import CHECKPOINT_SUBDIR, CheckpointError, SavedRun, absolute
from simclrv2_jax.models import block_stack
from simclrv2_jax.train import optim, parallel

SET_ASIDE_SUBDIR = "checkpoints_set_aside"


def _brief(error: BaseException) -> str:
    """The first line of an error, for a one-line report."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of the array leaves of a state tree or of its checkpoint metadata."""
    return {
        jax.tree_util.keystr(k): tuple(v.shape)
        for k, v in jax.tree_util.tree_leaves_with_path(tree)
        if hasattr(v, "shape")
    }


_all_finite = jax.jit(optim.all_finite)


def all_finite(tree: Any) -> bool:
    """Whether every floating-point array in ``tree`` is finite (one reduction on the device)."""
    return bool(_all_finite(tree))


class Checkpointer:
    """A CheckpointManager for one stage's workdir: async saves, keeps the last ``max_to_keep``.

    Knows which step it saved last, so that a save asked for twice (a stop right after a periodic
    save) is a no-op instead of Orbax's "already exists" error.
    """

    def __init__(
        self, workdir: str, *, max_to_keep: int = 5, save_interval_steps: int = 1, async_save: bool = True
    ):
        self.workdir = absolute(workdir)
        self.directory = self.workdir / CHECKPOINT_SUBDIR
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=max(1, save_interval_steps),
            enable_async_checkpointing=async_save,
            create=True,
            # Half-written saves of a killed run: the workdir lock guarantees no other run writes here.
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=self._options)
        self.last_saved_step: int | None = None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def path(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def save(
        self, step: int, state: Any, config: ml_collections.ConfigDict | None = None, force: bool = False
    ) -> bool:
        """Starts an async save of ``state`` at ``step``; False if that step is already saved.

        Refuses (FloatingPointError) a state with a non-finite value: nothing non-finite reaches disk.
        """
        if step == self.last_saved_step or step in self.manager.all_steps():
            return False
        if not all_finite(state):
            raise FloatingPointError(
                f"Refusing to save a checkpoint at step {step}: the state holds non-finite values. "
                f"The last finite checkpoint stays in {self.directory}."
            )
        items = {"state": ocp.args.StandardSave(state)}
        if config is not None:
            items["config"] = ocp.args.JsonSave(config.to_dict())
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            self.last_saved_step = step
            logging.info("Saving checkpoint at step %d to %s", step, self.directory)
        return saved

    def saved_config(self, step: int) -> dict[str, Any] | None:
        """The config JSON saved with ``step``; None if that checkpoint has none."""
        if not (self.path(step) / "config").exists():
            return None
        return SavedRun(self.directory).step_config(step)

    def _check_structure(self, step: int, saved_tree: Any, abstract_state: Any) -> None:
        """CheckpointError listing the differences if the saved state has another structure."""
        saved = _shapes(saved_tree)
        wanted = _shapes(ocp.tree.serialize_tree(abstract_state, keep_empty_nodes=True))
        if saved == wanted:
            return
        lines = [
            f"The checkpoint at {self.path(step)} holds a state of another structure than this run's "
            "model and optimiser, so the run cannot resume from it:"
        ]
        differences = sorted(set(saved) ^ set(wanted)) + sorted(
            p for p in set(saved) & set(wanted) if saved[p] != wanted[p]
        )
        for p in differences[:8]:
            lines.append(
                f"  state{p}: checkpoint {saved.get(p, 'absent')}, this run {wanted.get(p, 'absent')}"
            )
        if len(differences) > 8:
            lines.append(f"  ... and {len(differences) - 8} more")
        lines.append("Run with the config the checkpoint was trained with, or use another --workdir.")
        raise CheckpointError("\n".join(lines))

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Restores the whole state of ``step`` onto the shardings given in ``abstract_state``.

        A state saved with the other block layout (``scan_blocks``) is read in its own layout and
        converted (``models.block_stack``), each array then placed on ``abstract_state``'s sharding.
        """
        saved_tree = SavedRun(self.directory).step_tree(step)
        as_saved = block_stack.like(abstract_state, saved_tree)
        self._check_structure(step, saved_tree, as_saved)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(as_saved))
        )
        state = restored["state"]
        if as_saved is not abstract_state:
            logging.info("Converting the checkpoint at %s to this run's block layout.", self.path(step))
            state = block_stack.like(state, abstract_state)
            state = jax.tree_util.tree_map(lambda x, a: jax.device_put(x, a.sharding), state, abstract_state)
        if not all_finite(state):
            raise FloatingPointError("the state holds non-finite values")
        return state

    def set_aside(self, step: int, why: str) -> epath.Path:
        """Moves a checkpoint that fails to load out of ``checkpoints/``; returns where it went."""
        destination = self.workdir / SET_ASIDE_SUBDIR / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        destination.parent.mkdir(parents=True, exist_ok=True)
        self.path(step).rename(destination)
        logging.warning(
            "The checkpoint at %s does not load (%s); moved it to %s (nothing is deleted).",
            self.path(step),
            why,
            destination,
        )
        self.manager.reload()
        return destination

    def restore_latest(
        self, abstract_state: Any, check_config: Callable[[dict | None, epath.Path], None] | None = None
    ) -> tuple[Any, int, dict | None] | None:
        """``(state, step, saved config)`` of the newest checkpoint that loads; None if there is none.

        ``check_config(saved_config, path)`` may refuse a checkpoint by raising (a user error: the
        run stops, nothing is moved). A checkpoint that fails to load is moved aside, with a warning
        naming its path and the error, and the next newest one is tried.
        """
        set_aside: list[str] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                saved_config = self.saved_config(step)
            except Exception as e:  # any failure to read: a damaged checkpoint
                set_aside.append(str(self.set_aside(step, f"its config does not read: {_brief(e)}")))
                continue
            if check_config is not None:
                check_config(saved_config, self.path(step))
            try:
                state = self.restore(step, abstract_state)
            except CheckpointError:
                raise
            except Exception as e:  # any failure to load: a damaged checkpoint
                set_aside.append(str(self.set_aside(step, _brief(e))))
                continue
            if set_aside:
                logging.warning(
                    "Resuming from the newest checkpoint that loads, step %d at %s.", step, self.path(step)
                )
            return state, step, saved_config
        if set_aside:
            raise CheckpointError(
                f"No checkpoint in {self.directory} loads; the damaged ones were moved to "
                f"{', '.join(set_aside)}. Run the command again to start this stage afresh, or move a "
                "repaired checkpoint back into the checkpoints folder."
            )
        return None

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def initialize_from(
    path: str, mesh: jax.sharding.Mesh, *, what: str, keep_head: bool, flag: str | None = None
):
    """A stage's ``initialize(state, tx)``: the weights and BN statistics of the checkpoint at ``path``.

    Every parameter the new model shares with the checkpoint is replaced by the saved one (see
    ``SavedRun.load_variables``); the supervised head is taken only with ``keep_head``, otherwise it keeps its
    fresh initialisation. The optimiser state starts anew for the new parameters.
    """

    def initialize(state, tx):
        target = {"params": dict(state.params), "batch_stats": state.batch_stats}
        if not keep_head:
            target["params"].pop("head_supervised", None)
        restored, step = SavedRun(path, flag or config_lib.flag("checkpoint")).load_variables(
            target, sharding=parallel.replicated(mesh), what=what
        )
        params = {**state.params, **restored["params"]}
        logging.info(
            "Initialised from the %s at %s (step %d): %s", what, path, step, sorted(restored["params"])
        )
        return state.replace(params=params, batch_stats=restored["batch_stats"], opt_state=tx.init(params))

    return initialize
