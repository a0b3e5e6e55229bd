"""Orbax checkpoints: periodic async saves with the config beside them, resume, stage handoff.

Layout of a stage's workdir::

    WORKDIR/checkpoints/<step>/state    the whole TrainState (params, batch_stats, opt_state, rng, step)
    WORKDIR/checkpoints/<step>/config   the run's config as JSON

A later stage reads ``params`` and ``batch_stats`` of an earlier stage's latest checkpoint by name
(``load_variables``); the parts the new model has (backbone, the projection-head layers up to
``ft_proj_selector``) must be present with the same shapes, anything else is ignored.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from simclrv2_jax import parallel
from simclrv2_jax.fields import ARCH_FIELDS

CHECKPOINT_SUBDIR = "checkpoints"


def _absolute(path: str) -> epath.Path:
    """Orbax needs absolute paths; object-store URLs (gs://...) already are."""
    path = os.fspath(path)
    return epath.Path(path if "://" in path else os.path.abspath(path))


class CheckpointError(ValueError):
    """A checkpoint that is missing or does not fit the model being built."""


class Checkpointer:
    """A CheckpointManager for one stage's workdir: async saves, keeps the last ``max_to_keep``."""

    def __init__(
        self, workdir: str, *, max_to_keep: int = 5, save_interval_steps: int = 1, async_save: bool = True
    ):
        self.directory = _absolute(workdir) / CHECKPOINT_SUBDIR
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=max(1, save_interval_steps),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self, step: int, state: Any, config: ml_collections.ConfigDict | None = None, force: bool = False
    ) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if config is not None:
            items["config"] = ocp.args.JsonSave(config.to_dict())
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            logging.info("Saving checkpoint at step %d to %s", step, self.directory)
        return saved

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Restores the whole state onto the shardings given in ``abstract_state``."""
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        return restored["state"]

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def checkpoint_dir(path: str) -> tuple[epath.Path, int]:
    """Accepts a stage workdir, its checkpoints/ folder, or one step's folder; returns (dir, step)."""
    p = _absolute(path)
    if not p.exists():
        raise CheckpointError(
            f"Checkpoint path {path} does not exist. Point --config.checkpoint at a "
            "stage's workdir, its checkpoints/ folder or one step folder in it."
        )
    if (p / "state").exists() and p.name.isdigit():
        return p.parent, int(p.name)
    if (p / CHECKPOINT_SUBDIR).exists():
        p = p / CHECKPOINT_SUBDIR
    steps = sorted(int(c.name) for c in p.iterdir() if c.name.isdigit() and (c / "state").exists())
    if not steps:
        raise CheckpointError(
            f"No finished checkpoint under {path} (expected <step>/state folders). "
            "Has that stage saved a checkpoint yet?"
        )
    return p, steps[-1]


def _reader(directory: epath.Path) -> ocp.CheckpointManager:
    """A read-only manager that knows both items, so their metadata can be read before restoring."""
    return ocp.CheckpointManager(
        directory,
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "config": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(create=False),
    )


def read_config(path: str) -> dict[str, Any]:
    """The config JSON saved beside the latest checkpoint under ``path``."""
    directory, step = checkpoint_dir(path)
    manager = _reader(directory)
    try:
        return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    finally:
        manager.close()


def _paths(tree: Any) -> dict[str, Any]:
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def load_variables(
    path: str, target: dict[str, Any], *, sharding: jax.sharding.Sharding, what: str = "checkpoint"
) -> tuple[dict[str, Any], int]:
    """Restores ``{'params', 'batch_stats'}`` from the checkpoint at ``path`` into ``target``'s structure.

    ``target`` (arrays or ShapeDtypeStructs) names what the new model needs; every one of its leaves
    must exist in the checkpoint with the same shape, else a ``CheckpointError`` lists the
    differences on both sides. Returns the restored variables and the checkpoint's step.
    """
    directory, step = checkpoint_dir(path)
    manager = _reader(directory)
    try:
        metadata = manager.item_metadata(step)["state"]
        saved = metadata.tree if hasattr(metadata, "tree") else metadata
        saved = {k: saved[k] for k in ("params", "batch_stats") if k in saved}
        saved_paths = _paths(saved)
        want_paths = _paths(target)
        missing = sorted(set(want_paths) - set(saved_paths))
        mismatched = sorted(
            p
            for p in set(want_paths) & set(saved_paths)
            if tuple(want_paths[p].shape) != tuple(saved_paths[p].shape)
        )
        if missing or mismatched:
            lines = [f"The {what} at {directory / str(step)} does not fit the model this config builds."]
            for p in mismatched[:10]:
                lines.append(
                    f"  {p}: checkpoint has shape {tuple(saved_paths[p].shape)}, "
                    f"model needs {tuple(want_paths[p].shape)}"
                )
            for p in missing[:10]:
                lines.append(f"  {p}: needed by the model, absent from the checkpoint")
            extra = max(0, len(missing) - 10) + max(0, len(mismatched) - 10)
            if extra > 0:
                lines.append(f"  ... and {extra} more")
            lines.append(
                f"Check {', '.join(ARCH_FIELDS)} and ft_proj_selector against the checkpoint's config.json."
            )
            raise CheckpointError("\n".join(lines))
        abstract = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), saved
        )
        # Partial restore: only params and batch_stats are read, never the optimiser state.
        restore = ocp.args.PyTreeRestore(
            item=abstract,
            partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        )
        restored = manager.restore(step, args=ocp.args.Composite(state=restore))["state"]
    finally:
        manager.close()
    restored_paths = _paths(restored)
    leaves = [restored_paths[p] for p in want_paths]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), leaves), step


def initialize_from(path: str, mesh: jax.sharding.Mesh, *, what: str, keep_head: bool):
    """A stage's ``initialize(state, tx)``: the weights and BN statistics of the checkpoint at ``path``.

    Every parameter the new model shares with the checkpoint is replaced by the saved one (see
    ``load_variables``); the supervised head is taken only with ``keep_head``, otherwise it keeps its
    fresh initialisation. The optimiser state starts anew for the new parameters.
    """

    def initialize(state, tx):
        target = {"params": dict(state.params), "batch_stats": state.batch_stats}
        if not keep_head:
            target["params"].pop("head_supervised", None)
        restored, step = load_variables(path, target, sharding=parallel.replicated(mesh), what=what)
        params = {**state.params, **restored["params"]}
        logging.info(
            "Initialised from the %s at %s (step %d): %s", what, path, step, sorted(restored["params"])
        )
        return state.replace(params=params, batch_stats=restored["batch_stats"], opt_state=tx.init(params))

    return initialize
