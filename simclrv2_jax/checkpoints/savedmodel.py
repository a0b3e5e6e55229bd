"""A run's checkpoint as a TF2 SavedModel called like the authors' released ones.

The library behind ``python -m simclrv2_jax.export --workdir=RUN --out=DIR [--step=N] [--image_size=S]``,
which writes DIR as a SavedModel that TensorFlow users load and call as they would a SimCLRv2 model from
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

Which model (``SavedRun.load_model``). The config saved beside the checkpoint says the architecture;
the checkpoint, its contents:

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

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from simclrv2_jax.checkpoints.saved_run import LoadedModel, SavedRun

INFO_PATH = os.path.join("assets.extra", "simclr_export.json")
# Where the released programs run: the exported one is lowered for each, so it runs on any of them.
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
# The model's outputs that are not in the release's dict (the projection head's list of hiddens).
_NOT_EXPORTED = ("hiddens",)


class ExportError(ValueError):
    """A workdir that cannot be exported (no config, no checkpoint, no such step) or a bad --out."""


def named_outputs(outputs: dict[str, Any]) -> dict[str, Any]:
    """The model's outputs that the release returns, in float32."""
    return {k: v.astype(jnp.float32) for k, v in outputs.items() if k not in _NOT_EXPORTED}


@contextlib.contextmanager
def stablehlo_readable_by_tensorflow() -> Iterator[None]:
    """jax2tf embeds the model as a StableHLO artifact serialized for a StableHLO version about four
    weeks older than JAX's own; a TensorFlow release older than that cannot read it ("unregistered
    operation 'vhlo....'"). While this is active the artifact is serialized for the StableHLO version of
    the installed TensorFlow when that is the older one (StableHLO writes any version back to its
    minimum, as long as the program uses no newer op). It replaces JAX's internal serialization
    function for the duration; where JAX or TensorFlow lack what it needs, it changes nothing."""
    try:
        from jax._src.export import _export
        from jax._src.lib import _jax
        from jax._src.lib.mlir.dialects import hlo
        from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_stablehlo
    except ImportError:
        yield
        return
    original = getattr(_export, "_module_to_bytecode", None)
    if original is None:
        yield
        return

    def to_bytecode(module):
        jax_target = hlo.get_version_from_compatibility_requirement(
            hlo.StablehloCompatibilityRequirement.WEEK_4
        )
        target = hlo.get_smaller_version(jax_target, tf_stablehlo.get_current_version())
        from jax._src import xla_bridge

        return _jax.mlir.serialize_portable_artifact(
            module, target, xla_bridge.get_backend().serialize_with_sdy
        )

    _export._module_to_bytecode = to_bytecode
    try:
        yield
    finally:
        _export._module_to_bytecode = original


def _absolute(path: str) -> str:
    path = os.fspath(path)
    return path if "://" in path else os.path.abspath(path)


def _variable_name(path: tuple[Any, ...], collection: str) -> str:
    return "/".join([collection, *(str(getattr(k, "key", k)) for k in path)])


def _side(run: LoadedModel, image_size: int | None) -> int | None:
    """The height and width ``__call__`` takes: the run's image size by default, None for any."""
    if image_size is None:
        return int(run.config.image_size)
    if image_size < 0:
        raise ExportError(f"--image_size={image_size}: use a positive size, or 0 for any height and width.")
    return int(image_size) or None


def input_spec(run: LoadedModel, image_size: int | None = None):
    """The ``tf.TensorSpec`` of the images: any batch size; see ``export_saved_model`` for the sides."""
    import tensorflow as tf

    side = _side(run, image_size)
    return tf.TensorSpec([None, side, side, run.channels], tf.float32, name="inputs")


def build_module(
    run: LoadedModel, *, image_size: int | None = None, platforms: tuple[str, ...] = DEFAULT_PLATFORMS
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
    if not os.path.isdir(_absolute(workdir)) and "://" not in os.fspath(workdir):
        raise ExportError(f"--workdir {workdir} does not exist or is not a directory.")
    saved = SavedRun(workdir, "--workdir")
    run = saved.first_that_loads(saved.load_model, step)
    side = _side(run, image_size)
    # Written in a folder of its own beside ``out`` and moved there only when complete: never a
    # half-written SavedModel at ``out``, nothing left behind when the export fails, and no other
    # export's (or anyone's) folder touched.
    parent = os.path.dirname(out_path)
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f".{os.path.basename(out_path)}.export-", dir=parent)
    try:
        with stablehlo_readable_by_tensorflow():
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
            "class_names": saved.class_names(),
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
        if os.path.isdir(out_path) and not os.listdir(out_path):
            os.rmdir(out_path)  # empty, checked above
        try:
            os.rename(partial, out_path)
        except OSError:
            raise ExportError(
                f"--out {out} was filled by someone else while this export ran; this export is discarded, "
                "theirs is kept. Choose a new --out."
            ) from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return info
