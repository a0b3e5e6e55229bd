"""One reader for a run on disk: its config, its finished checkpoints, their shapes, its head, its weights.

A run's workdir (written by training, or by ``convert`` from a released checkpoint) looks like::

    WORKDIR/config.json                 the run's config
    WORKDIR/checkpoints/<step>/state    the TrainState (params, batch_stats, opt_state, rng, step, ...)
    WORKDIR/checkpoints/<step>/config   the config the step was saved with

``SavedRun(path)`` accepts the workdir, its ``checkpoints/`` folder or one ``<step>`` folder (then that
step is the run's "latest"). Everything that reads a saved run goes through it: evaluation, export,
exploring a model, a stage starting from an earlier stage's checkpoint (``initialize_from``), a
distillation teacher, and a resumed run's config check. Nothing here loads the optimiser state.

* ``steps()``: the finished checkpoints only. A step folder counts when Orbax has finalised it (its
  ``commit_success.txt`` or ``_CHECKPOINT_METADATA`` is written last), so a save still under way on a
  store without atomic renames (``gs://``) is never taken for a checkpoint.
* ``config(step)``: the saved config over the stage's current defaults (``config.from_saved``, the one
  rule for runs saved by another version).
* ``shapes(step)``, ``modules(step)``, ``head_mode(step)``, ``num_classes(step)``, ``channels(step)``:
  read from the checkpoint's metadata, without loading an array.
* ``load_variables(target, ...)``: ``params`` and ``batch_stats`` restored into the structure a model
  needs, in either block layout (``scan_blocks``), with one error listing what does not fit.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from simclrv2_jax import config as config_lib
from simclrv2_jax.config.fields import ARCH_FIELDS
from simclrv2_jax.models import block_stack
from simclrv2_jax.models.heads import kept_head_layers

CHECKPOINT_SUBDIR = "checkpoints"
CONFIG_NAME = "config.json"
_FINALISED_MARKERS = ("commit_success.txt", "_CHECKPOINT_METADATA")


class CheckpointError(ValueError):
    """A checkpoint that is missing or does not fit the model being built."""


class DamagedCheckpoint(ValueError):
    """A checkpoint whose files do not read (truncated, deleted, without metadata)."""


def _brief(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def absolute(path: str | os.PathLike) -> epath.Path:
    """Orbax needs absolute paths; object-store URLs (gs://...) already are."""
    path = os.fspath(path)
    return epath.Path(path if "://" in path else os.path.abspath(path))


def is_finished(step_dir: epath.Path) -> bool:
    """Whether ``step_dir`` (``checkpoints/<step>``) holds a checkpoint Orbax finished writing."""
    if not (step_dir.name.isdigit() and (step_dir / "state").exists()):
        return False
    if not any((step_dir / marker).exists() for marker in _FINALISED_MARKERS):
        return False
    return bool(ocp.step.is_path_finalized(step_dir))


def finished_steps(directory: epath.Path) -> list[int]:
    """The finished checkpoint steps in a ``checkpoints/`` folder, in increasing order."""
    try:
        children = list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(c.name) for c in children if is_finished(c))


def reader(directory: epath.Path) -> ocp.CheckpointManager:
    """A read-only manager that knows both items, so their metadata can be read before restoring."""
    return ocp.CheckpointManager(
        directory,
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "config": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(create=False),
    )


def _paths(tree: Any) -> dict[str, Any]:
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _as_dict(tree: Any) -> Any:
    """Nested plain dicts of a metadata tree (Orbax may hand back other mappings)."""
    if hasattr(tree, "items"):
        return {str(k): _as_dict(v) for k, v in tree.items()}
    return tree


def head_mode_of(config: ml_collections.ConfigDict, saved_params: dict[str, Any]) -> str:
    """``SavedRun.head_mode`` from a run's config and the parameter tree (or its shapes) it saved."""
    if config.stage == "pretrain":
        return "pretrain"
    kept = kept_head_layers(config.proj_head_mode, config.num_proj_layers, config.ft_proj_selector)
    saved_layers = sum(1 for name in saved_params.get("head_projection", {}) if name.startswith("layer_"))
    return "full" if saved_layers > kept else "finetune"


class SavedRun:
    """A run on disk (see the module docstring). ``flag`` names the command-line flag that gave the
    path, so that an error says which flag to fix."""

    def __init__(self, path: str | os.PathLike, flag: str = "--workdir") -> None:
        self.given = os.fspath(path)
        self.flag = flag
        p = absolute(path)
        if not p.exists():
            raise CheckpointError(
                f"Checkpoint path {self.given} does not exist. Point {flag} at a stage's workdir, its "
                "checkpoints/ folder or one step folder in it."
            )
        self.pinned_step: int | None = None
        if p.name.isdigit() and (p / "state").exists():
            self.directory, self.pinned_step = p.parent, int(p.name)
        elif p.name == CHECKPOINT_SUBDIR and not (p / CHECKPOINT_SUBDIR).exists():
            self.directory = p
        else:  # a workdir (its checkpoints/ folder may not exist yet)
            self.directory = p / CHECKPOINT_SUBDIR
        self.root = self.directory.parent

    # ---- Which checkpoints.

    def steps(self) -> list[int]:
        """The finished checkpoint steps (only the pinned one when a step folder was given)."""
        steps = finished_steps(self.directory)
        if self.pinned_step is not None:
            return [s for s in steps if s == self.pinned_step]
        return steps

    def latest_step(self) -> int:
        """The pinned step, or the newest finished one; a ``CheckpointError`` when there is none."""
        steps = self.steps()
        if not steps:
            what = f"step {self.pinned_step}" if self.pinned_step is not None else "checkpoint"
            raise CheckpointError(
                f"No finished {what} under {self.given} (expected <step>/state folders in "
                f"{self.directory}; given by {self.flag}). Has that run saved a checkpoint yet?"
            )
        return steps[-1]

    def resolve(self, step: int | None) -> int:
        """``step`` checked against the finished steps, or the latest when None."""
        if step is None:
            return self.latest_step()
        steps = self.steps()
        if step not in steps:
            raise CheckpointError(f"No checkpoint of step {step} under {self.given}; it has steps {steps}.")
        return step

    def step_path(self, step: int) -> epath.Path:
        return self.directory / str(step)

    # ---- The config.

    def saved_config(self, step: int | None = None) -> dict[str, Any]:
        """The config as saved beside checkpoint ``step`` (else the workdir's config.json), raw."""
        return self.step_config(self.resolve(step))

    def step_config(self, step: int) -> dict[str, Any]:
        """``saved_config`` of a step folder whether or not it is finished (resume reads each one)."""
        if (self.step_path(step) / "config").exists():
            manager = reader(self.directory)
            try:
                restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
                return dict(restored["config"])
            except Exception as e:
                raise DamagedCheckpoint(
                    f"the config of {self.step_path(step)} does not read ({_brief(e)})"
                ) from e
            finally:
                manager.close()
        path = self.root / CONFIG_NAME
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"The checkpoint at {self.step_path(step)} has no config beside it, and {path} does not "
                f"read ({type(e).__name__}); is {self.given} a run of this project?"
            ) from None

    def config(self, step: int | None = None) -> ml_collections.ConfigDict:
        """The saved config as a full config of its stage (``config.from_saved``)."""
        try:
            return config_lib.from_saved(self.saved_config(step))
        except ValueError as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{self.given}: {e} Is it a run of this project?") from None

    # ---- What the checkpoint holds (metadata only).

    def step_tree(self, step: int) -> dict[str, Any]:
        """The saved state's metadata tree of a step folder, finished or not."""
        manager = reader(self.directory)
        try:
            metadata = manager.item_metadata(step)["state"]
        except Exception as e:
            raise DamagedCheckpoint(
                f"the metadata of {self.step_path(step)} does not read ({_brief(e)})"
            ) from e
        finally:
            manager.close()
        if metadata is None:
            raise DamagedCheckpoint(f"the metadata of {self.step_path(step)}/state is missing")
        return _as_dict(metadata.tree if hasattr(metadata, "tree") else metadata)

    def state_tree(self, step: int | None = None) -> dict[str, Any]:
        """The whole saved state's metadata tree (each leaf with ``shape`` and ``dtype``)."""
        return self.step_tree(self.resolve(step))

    def shapes(self, step: int | None = None) -> dict[str, Any]:
        """``{'params': ..., 'batch_stats': ...}`` of the checkpoint, leaves ``ShapeDtypeStruct``."""
        tree = self.state_tree(step)
        saved = {k: tree[k] for k in ("params", "batch_stats") if k in tree}
        return jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), saved)

    def modules(self, step: int | None = None) -> set[str]:
        """The top-level parameter modules, e.g. ``{'backbone', 'head_projection', 'head_supervised'}``."""
        return set(self.shapes(step).get("params", {}))

    def head_mode(self, step: int | None = None) -> str:
        """The model mode of the network the checkpoint holds: ``pretrain`` for pretraining runs;
        ``finetune`` for fine-tuned and distilled networks, or ``full`` when it holds projection
        layers past ``ft_proj_selector`` (a converted release checkpoint), so no saved layer is dropped."""
        return head_mode_of(self.config(step), self.shapes(step).get("params", {}))

    def num_classes(self, step: int | None = None) -> int:
        """The supervised head's classes (its kernel's width), else the config's ``num_classes``."""
        kernel = self.shapes(step).get("params", {}).get("head_supervised", {}).get("dense", {}).get("kernel")
        return int(kernel.shape[-1]) if kernel is not None else int(self.config(step).num_classes)

    def class_names(self) -> list[str] | None:
        """The class names the run was trained with (an image folder's class folders), if recorded."""
        from simclrv2_jax.checkpoints import lineage

        record = lineage.read(self.root) or {}
        return list(record["class_names"]) if record.get("class_names") else None

    def channels(self, step: int | None = None) -> int:
        """The image channels the first convolution takes."""
        stem = self.shapes(step).get("params", {}).get("backbone", {}).get("stem", {})
        kernel = stem.get("conv_0", {}).get("kernel")
        return int(kernel.shape[2]) if kernel is not None else 3

    # ---- Weights.

    def load_variables(
        self,
        target: dict[str, Any],
        *,
        sharding: jax.sharding.Sharding,
        step: int | None = None,
        what: str = "checkpoint",
    ) -> tuple[dict[str, Any], int]:
        """``{'params', 'batch_stats'}`` of checkpoint ``step`` (default: latest) in ``target``'s structure.

        ``target`` (arrays or ShapeDtypeStructs) names what the model needs; every one of its leaves
        must be in the checkpoint with the same shape (in either block layout), else one
        ``CheckpointError`` lists the differences. Anything else in the checkpoint is not read.
        Returns the variables, placed on ``sharding``, and the step.
        """
        step = self.resolve(step)
        saved = self.shapes(step)
        shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype), target)
        as_saved = block_stack.like(shapes, saved)  # the target in the checkpoint's block layout
        saved_paths, want_paths = _paths(saved), _paths(as_saved)
        missing = sorted(set(want_paths) - set(saved_paths))
        mismatched = sorted(
            p
            for p in set(want_paths) & set(saved_paths)
            if tuple(want_paths[p].shape) != tuple(saved_paths[p].shape)
        )
        if missing or mismatched:
            lines = [f"The {what} at {self.step_path(step)} does not fit the model this config builds."]
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
        manager = reader(self.directory)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=restore))["state"]
        except Exception as e:
            raise DamagedCheckpoint(f"the arrays of {self.step_path(step)} do not read ({_brief(e)})") from e
        finally:
            manager.close()
        restored_paths = _paths(restored)
        picked = jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(as_saved), [restored_paths[p] for p in want_paths]
        )
        converted = _paths(block_stack.like(picked, shapes))
        leaves = [converted[p] for p in _paths(target)]
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), leaves), step

    def first_that_loads(self, load, step: int | None = None):
        """``load(step)`` of the given step, or of the newest checkpoint for which it succeeds: a
        damaged checkpoint (``DamagedCheckpoint``: a truncated file, missing metadata) is reported
        and the one before it tried, as a resumed run does. Any other error (a checkpoint that does
        not fit the model, a wrong setting) stops at once."""
        if step is not None:
            return load(self.resolve(step))
        failures = []
        for candidate in reversed(self.steps()):
            try:
                result = load(candidate)
            except DamagedCheckpoint as e:
                failures.append(f"step {candidate}: {e}")
                logging.warning("The checkpoint at %s does not load: %s.", self.step_path(candidate), e)
                continue
            if failures:
                where = self.step_path(candidate)
                logging.warning("Using the newest checkpoint that loads: step %d at %s.", candidate, where)
            return result
        if failures:
            raise CheckpointError(f"No checkpoint under {self.given} loads: {'; '.join(failures)}.")
        return load(self.latest_step())  # raises the error of a run without checkpoints

    # ---- The model, ready to apply.

    def load_model(self, step: int | None = None) -> LoadedModel:
        """The network of checkpoint ``step`` (default: latest) with its weights, for inference or
        export: one device, no sharding, float32, per-call batch norm, unrolled blocks (one entry per
        block, as the release names them), the head mode the checkpoint holds (``head_mode``)."""
        from simclrv2_jax.train import components, parallel

        step = self.resolve(step)
        config = self.config(step)
        head_mode, num_classes, channels = self.head_mode(step), self.num_classes(step), self.channels(step)
        model = components.build_model(
            config,
            head_mode=head_mode,
            num_classes=num_classes,
            mesh=parallel.create_mesh(1),
            num_bn_groups=0,
            dtype=jax.numpy.float32,
            scan_blocks=False,
        )
        target = components.abstract_variables(model, (config.image_size, config.image_size, channels))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        variables, step = self.load_variables(target, sharding=device, step=step)
        variables = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), variables)
        return LoadedModel(
            model, variables, config, step, head_mode, num_classes, channels, os.fspath(self.step_path(step))
        )


@dataclasses.dataclass
class LoadedModel:
    """A saved run's network and weights: ``model.apply(variables, images, train=False)``."""

    model: Any  # SimCLRModel, single device, float32
    variables: dict[str, Any]  # {'params', 'batch_stats'} as NumPy arrays
    config: ml_collections.ConfigDict
    step: int
    head_mode: str
    num_classes: int
    channels: int
    checkpoint: str  # RUN/checkpoints/<step>
