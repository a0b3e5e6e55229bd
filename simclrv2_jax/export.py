"""A run's checkpoint as a TF2 SavedModel called like the authors' released ones.

``python -m simclrv2_jax.export --workdir=RUN --out=DIR [--step=N] [--image_size=S]`` writes DIR as
a SavedModel that TensorFlow users load and call as they would a SimCLRv2 model from
``gs://simclr-checkpoints-tf2/``::

    model = tf.saved_model.load(DIR)
    outputs = model(images, trainable=False)  # images: float32 [N, S, S, C] in [0, 1], any N
    outputs["final_avg_pool"], outputs["proj_head_output"], outputs["logits_sup"], ...

Like the release:

* ``model(inputs, trainable)`` is a ``tf.function`` with two concrete functions, ``trainable`` a Python
  bool (positional or keyword). ``False``: batch norm in inference mode (moving statistics).
  ``True``: batch statistics, and the moving mean and variance are updated in place with the run's
  ``batch_norm_decay``, as the release's Keras batch norms do in training mode (so that fine-tuning
  the loaded model in TensorFlow keeps them current).
* It returns a dict of the model's named outputs: ``initial_conv``, ``initial_max_pool``,
  ``block_group1..4``, ``final_avg_pool``, ``proj_head_input``, ``proj_head_output`` and
  ``logits_sup`` where the model has a supervised head.
* The weights are ``tf.Variable``s (``model.trainable_variables_list``, as in the release, and the
  batch-norm statistics in ``model.batch_stats_list``, each named by its Flax path), not constants
  baked into the graph, and gradients flow to them: the model can be fine-tuned with
  ``tf.GradientTape``.

One difference, the image size. The batch size is always free. By default the height and width are
the run's ``image_size`` (S above) and the model is differentiable. ``--image_size=0`` takes any
height and width, like the release, but then has no gradients: JAX cannot differentiate a strided
convolution whose padding depends on a symbolic image size. ``--image_size=N`` fixes another size.

How. The Flax model is converted with ``jax.experimental.jax2tf`` (native serialization: the
StableHLO of ``model.apply`` is embedded and run by TensorFlow's XLA), with the parameters and
statistics passed as arguments that the ``tf.function`` reads from its variables; the batch size
(and with ``--image_size=0`` the height and width) are symbolic dimensions. The program is lowered
for the CPU, CUDA GPUs and TPUs (``--platforms``), on a single device with no sharding: per-device batch norm
(``global_bn=False``) becomes batch norm over the whole call's batch, as in the release. It computes
in float32 whatever ``compute_dtype`` the run trained with, because the release's outputs are float32.

Which model. The stage config in ``RUN/config.json`` says the architecture; the checkpoint, its
contents:

* ``pretrain`` runs: backbone, the whole projection head (``proj_head_output`` is its output) and,
  with ``lineareval_while_pretraining``, the linear-evaluation head on the backbone output.
* ``finetune`` and ``distill`` runs: the fine-tuned network (``finetune`` head mode): the
  projection-head layers up to ``ft_proj_selector`` and the supervised head on their output, which
  is also ``proj_head_output``. A workdir converted from a release (``simclrv2_jax.convert``) keeps
  the whole projection head; then the ``full`` head mode is used, which gives the release's outputs.
* ``num_classes = 0`` in the config ("from the data set") is read from the checkpoint's
  supervised-head kernel, and the number of image channels from its first convolution.

Beside the model, ``DIR/assets.extra/simclr_export.json`` records what was exported (run, step,
stage, head mode, input shape, outputs, the config).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from simclrv2_jax import fields
from simclrv2_jax.checkpoints import CHECKPOINT_SUBDIR
from simclrv2_jax.models.heads import kept_head_layers

CONFIG_NAME = "config.json"
INFO_PATH = os.path.join("assets.extra", "simclr_export.json")
# Where the released programs run: the exported one is lowered for each, so it runs on any of them.
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
# The model's outputs that are not in the release's dict (the projection head's list of hiddens).
_NOT_EXPORTED = ("hiddens",)


class ExportError(ValueError):
    """A workdir that cannot be exported (no config, no checkpoint, no such step) or a bad --out."""


@dataclass
class LoadedRun:
    """A run's model, ready to apply: what ``load_run`` reads and ``export_saved_model`` converts."""

    model: Any  # SimCLRModel, single device, float32
    variables: dict[str, Any]  # {'params', 'batch_stats'} as NumPy arrays
    config: ml_collections.ConfigDict
    step: int
    head_mode: str
    num_classes: int
    channels: int
    checkpoint: str  # RUN/checkpoints/<step>


def _absolute(path: str) -> str:
    """Orbax and the messages want absolute paths; object-store URLs (gs://...) already are."""
    path = os.fspath(path)
    return path if "://" in path else os.path.abspath(path)


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """``RUN/config.json`` over the stage's current defaults, so a run saved before a field existed loads.

    The defaults are those of ``fields.base_config`` (plus the fine-tuning fields for the later
    stages); every value the run saved wins.
    """
    path = epath.Path(_absolute(workdir)) / CONFIG_NAME
    if not path.is_file():
        raise ExportError(
            f"No {CONFIG_NAME} in {workdir} (looked for {path}): --workdir must be a stage's workdir as "
            "written by a training run (it holds config.json and checkpoints/)."
        )
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{path} does not read as JSON: {e}") from None
    stage = saved.get("stage") if isinstance(saved, dict) else None
    if stage not in fields.STAGES:
        raise ExportError(f"{path} names no known stage (stage={stage!r}; expected one of {fields.STAGES}).")
    defaults = fields.base_config(stage)
    if stage != "pretrain":
        fields.add_finetune_fields(defaults)
    merged = defaults.to_dict()
    merged.update(saved)
    return ml_collections.ConfigDict(merged)


def find_checkpoint(workdir: str, step: int | None = None) -> tuple[epath.Path, int]:
    """``(RUN/checkpoints/<step>, step)``: the given step, or the latest finished one."""
    directory = epath.Path(_absolute(workdir)) / CHECKPOINT_SUBDIR
    steps = []
    if directory.is_dir():
        steps = sorted(
            int(c.name) for c in directory.iterdir() if c.name.isdigit() and (c / "state").is_dir()
        )
    if not steps:
        raise ExportError(
            f"No checkpoint in {workdir} (expected {directory}/<step>/state): has the run saved one yet?"
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ExportError(
            f"No checkpoint of step {step} in {directory}; it holds steps {', '.join(map(str, steps))}."
        )
    return directory / str(step), step


def _saved_shapes(checkpoint: epath.Path) -> dict[str, Any]:
    """``{'params': ..., 'batch_stats': ...}`` of a checkpoint's metadata, as nested dicts of shapes
    (read without loading any array)."""
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(
        checkpoint.parent,
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "config": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(create=False),
    )
    try:
        metadata = manager.item_metadata(int(checkpoint.name))["state"]
    finally:
        manager.close()
    tree = metadata.tree if hasattr(metadata, "tree") else metadata
    return jax.tree_util.tree_map(
        lambda m: tuple(m.shape), {k: tree[k] for k in ("params", "batch_stats") if k in tree}
    )


def choose_head_mode(config: ml_collections.ConfigDict, saved_params: dict[str, Any]) -> str:
    """``pretrain`` for pretraining runs; ``finetune`` for fine-tuned and distilled networks, or
    ``full`` when the checkpoint holds projection-head layers past ``ft_proj_selector`` (a converted
    release), so that no saved layer is dropped and ``proj_head_output`` is the whole head's."""
    if config.stage == "pretrain":
        return "pretrain"
    kept = kept_head_layers(config.proj_head_mode, config.num_proj_layers, config.ft_proj_selector)
    saved_layers = sum(1 for name in saved_params.get("head_projection", {}) if name.startswith("layer_"))
    return "full" if saved_layers > kept else "finetune"


def load_run(workdir: str, step: int | None = None) -> LoadedRun:
    """The model of ``RUN/config.json`` with the weights of the checkpoint of ``step`` (default: latest).

    One device, no sharding, float32. ``ExportError`` (a ValueError naming the path) when the workdir,
    its config or its checkpoint is missing; ``CheckpointError`` when the checkpoint does not fit the
    model the config describes.
    """
    from simclrv2_jax import parallel
    from simclrv2_jax.checkpoints import load_variables
    from simclrv2_jax.train.components import build_model

    if not epath.Path(_absolute(workdir)).is_dir():
        raise ExportError(f"--workdir {workdir} does not exist or is not a directory.")
    config = read_run_config(workdir)
    checkpoint, step = find_checkpoint(workdir, step)
    saved = _saved_shapes(checkpoint)
    saved_params = saved.get("params", {})
    head_mode = choose_head_mode(config, saved_params)
    kernel = saved_params.get("head_supervised", {}).get("dense", {}).get("kernel")
    num_classes = int(kernel[-1]) if kernel else int(config.num_classes)
    stem_kernel = saved_params.get("backbone", {}).get("stem", {}).get("conv_0", {}).get("kernel")
    channels = int(stem_kernel[2]) if stem_kernel else 3
    model = build_model(
        config,
        head_mode=head_mode,
        num_classes=num_classes,
        mesh=parallel.create_mesh(1),
        num_bn_groups=0,
        dtype=jnp.float32,
        scan_blocks=False,  # one TF variable per block, as the release names them
    )
    images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, channels), jnp.float32)
    target = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    target = {"params": target["params"], "batch_stats": target.get("batch_stats", {})}
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    variables, step = load_variables(os.fspath(checkpoint), target, sharding=device, what="checkpoint")
    variables = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), variables)
    return LoadedRun(model, variables, config, step, head_mode, num_classes, channels, os.fspath(checkpoint))


def named_outputs(outputs: dict[str, Any]) -> dict[str, Any]:
    """The model's outputs that the release returns, in float32."""
    return {k: v.astype(jnp.float32) for k, v in outputs.items() if k not in _NOT_EXPORTED}


def _variable_name(path: tuple[Any, ...], collection: str) -> str:
    return "/".join([collection, *(str(getattr(k, "key", k)) for k in path)])


def _side(run: LoadedRun, image_size: int | None) -> int | None:
    """The height and width ``__call__`` takes: the run's image size by default, None for any."""
    if image_size is None:
        return int(run.config.image_size)
    if image_size < 0:
        raise ExportError(f"--image_size={image_size}: use a positive size, or 0 for any height and width.")
    return int(image_size) or None


def input_spec(run: LoadedRun, image_size: int | None = None):
    """The ``tf.TensorSpec`` of the images: any batch size; see ``export_saved_model`` for the sides."""
    import tensorflow as tf

    side = _side(run, image_size)
    return tf.TensorSpec([None, side, side, run.channels], tf.float32, name="inputs")


def build_module(
    run: LoadedRun, *, image_size: int | None = None, platforms: tuple[str, ...] = DEFAULT_PLATFORMS
):
    """The ``tf.Module`` that is saved: the variables, and ``__call__(inputs, trainable)`` traced for
    both values of ``trainable`` on images of ``input_spec``."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    model = run.model
    side = _side(run, image_size)
    param_leaves, param_def = jax.tree_util.tree_flatten_with_path(run.variables["params"])
    stat_leaves, stat_def = jax.tree_util.tree_flatten_with_path(run.variables["batch_stats"])

    def inference(params, batch_stats, images):
        return named_outputs(model.apply({"params": params, "batch_stats": batch_stats}, images, train=False))

    def training(params, batch_stats, images):
        outputs, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
        )
        return named_outputs(outputs), updates["batch_stats"]

    sides = "h, w" if side is None else f"{side}, {side}"
    options = dict(
        polymorphic_shapes=[None, None, f"(b, {sides}, {run.channels})"],
        # JAX cannot differentiate a strided convolution whose padding depends on a symbolic size.
        with_gradient=side is not None,
        native_serialization_platforms=tuple(platforms),
    )
    converted = {False: jax2tf.convert(inference, **options), True: jax2tf.convert(training, **options)}

    class SimCLRv2Model(tf.Module):
        """Holds the variables; called as ``model(inputs, trainable)`` like the released SavedModels."""

        def __init__(self):
            super().__init__(name="simclrv2")
            # Flat lists in the order of the Flax trees' leaves; each variable is named by its path.
            self.trainable_variables_list = [
                tf.Variable(np.asarray(v, np.float32), trainable=True, name=_variable_name(k, "params"))
                for k, v in param_leaves
            ]
            self.batch_stats_list = [
                tf.Variable(np.asarray(v, np.float32), trainable=False, name=_variable_name(k, "batch_stats"))
                for k, v in stat_leaves
            ]

        @tf.function(autograph=False)
        def __call__(self, inputs, trainable):
            params = jax.tree_util.tree_unflatten(param_def, list(self.trainable_variables_list))
            batch_stats = jax.tree_util.tree_unflatten(stat_def, list(self.batch_stats_list))
            if not trainable:
                return converted[False](params, batch_stats, inputs)
            outputs, updated = converted[True](params, batch_stats, inputs)
            # Keras batch norm in training mode moves its statistics; so does the release, so do we.
            for variable, value in zip(self.batch_stats_list, jax.tree_util.tree_leaves(updated)):
                variable.assign(value)
            return outputs

    module = SimCLRv2Model()
    spec = input_spec(run, image_size)
    for trainable in (True, False):
        module.__call__.get_concrete_function(spec, trainable)
    return module


def export_saved_model(
    workdir: str,
    out: str,
    step: int | None = None,
    *,
    image_size: int | None = None,
    platforms: tuple[str, ...] = DEFAULT_PLATFORMS,
) -> dict[str, Any]:
    """Writes the checkpoint of ``step`` (default: the latest) of the run in ``workdir`` to the local
    folder ``out`` as a TF2 SavedModel (see the module's docstring); returns what it records in
    ``assets.extra/simclr_export.json``.

    ``image_size``: the height and width the model takes. None: the run's ``image_size``, and the
    model is differentiable (fine-tunable in TensorFlow). 0: any height and width, like the release,
    but without gradients: JAX cannot differentiate a strided convolution whose padding depends on a
    symbolic image size. The batch size is free either way.

    ``out`` must be new or empty: an earlier export is never overwritten, and nothing is left at
    ``out`` if the export fails.
    """
    import tensorflow as tf

    out_path = _absolute(out)
    if "://" in out_path:
        raise ExportError(f"--out {out}: write the SavedModel to a local folder, then copy it.")
    if os.path.exists(out_path) and (not os.path.isdir(out_path) or os.listdir(out_path)):
        raise ExportError(f"--out {out} already exists and is not an empty folder; choose a new --out.")
    if image_size is not None and image_size < 0:
        raise ExportError(f"--image_size={image_size}: use a positive size, or 0 for any height and width.")
    run = load_run(workdir, step)
    side = _side(run, image_size)
    # Written beside ``out`` and moved there only when complete: never a half-written SavedModel at
    # ``out``, and nothing left behind when the export fails.
    partial = f"{out_path}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        module = build_module(run, image_size=image_size, platforms=tuple(platforms))
        tf.saved_model.save(
            module,
            partial,
            options=tf.saved_model.SaveOptions(experimental_custom_gradients=side is not None),
        )
        spec = input_spec(run, image_size)
        outputs = module.__call__.get_concrete_function(spec, False).structured_outputs
        info = {
            "workdir": _absolute(workdir),
            "checkpoint": run.checkpoint,
            "step": run.step,
            "stage": run.config.stage,
            "head_mode": run.head_mode,
            "num_classes": run.num_classes,
            "input_shape": [None, side, side, run.channels],
            "with_gradient": side is not None,
            "outputs": {name: list(spec.shape) for name, spec in sorted(outputs.items())},
            "platforms": list(platforms),
            "num_variables": len(module.trainable_variables_list) + len(module.batch_stats_list),
            "config": run.config.to_dict(),
        }
        os.makedirs(os.path.join(partial, os.path.dirname(INFO_PATH)), exist_ok=True)
        with open(os.path.join(partial, INFO_PATH), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)
        if os.path.isdir(out_path):
            os.rmdir(out_path)  # empty, checked above
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        os.replace(partial, out_path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return info


def main(argv: list[str]) -> int:
    from absl import app, logging

    from simclrv2_jax.cli import run_reporting_user_errors, start_up

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    start_up()
    code, info = run_reporting_user_errors(
        lambda: export_saved_model(
            _WORKDIR.value,
            _OUT.value,
            _STEP.value,
            image_size=_IMAGE_SIZE.value,
            platforms=tuple(p.strip() for p in _PLATFORMS.value if p.strip()),
        )
    )
    if code == 0:
        logging.info("Exported %s", {k: v for k, v in info.items() if k != "config"})
        shape = "[" + ", ".join(str(d or n) for d, n in zip(info["input_shape"], "NHWC")) + "]"
        print(
            f"Exported step {info['step']} of {_WORKDIR.value} ({info['stage']}, head mode "
            f"{info['head_mode']}) to {_OUT.value}: model = tf.saved_model.load({_OUT.value!r}); "
            f"model(images {shape}, trainable=False) -> {', '.join(info['outputs'])}."
        )
    return code


if __name__ == "__main__":
    from absl import app, flags

    _WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (config.json and checkpoints/).")
    _OUT = flags.DEFINE_string("out", None, "Local folder to write the SavedModel to (new or empty).")
    _STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export; default: the latest.")
    _IMAGE_SIZE = flags.DEFINE_integer(
        "image_size",
        None,
        "Height and width the model takes; default: the run's (then it is differentiable). 0: any size "
        "(then without gradients).",
    )
    _PLATFORMS = flags.DEFINE_list(
        "platforms", list(DEFAULT_PLATFORMS), "Platforms the exported program is lowered for."
    )
    flags.mark_flags_as_required(["workdir", "out"])
    from simclrv2_jax.cli import parse_flags

    app.run(main, flags_parser=parse_flags)
