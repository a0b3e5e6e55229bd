"""The authors' published SimCLRv2 checkpoints read into this project's ``SimCLRModel`` and workdirs
(the library behind ``python -m simclrv2_jax.convert``).

Two formats are read (``read_official``), from local paths or any TensorFlow file system (``gs://``):

* TF1 ``tf.train.Saver`` checkpoints (``gs://simclr-checkpoints/simclrv2/...``), named by ``tf.layers``
  auto-naming: ``base_model/conv2d_N/kernel``, ``base_model/batch_normalization_N/{gamma,beta,
  moving_mean,moving_variance}``, ``head_contrastive/nl_J/{dense,batch_normalization}/...`` and
  ``head_supervised/linear_layer/dense/{kernel,bias}``.
* TF2 SavedModels (``gs://simclr-checkpoints-tf2/...``) and TF2 object-based checkpoints: the values
  are in a checkpoint whose object graph records each variable's name at saving time
  (``resnet/block_group1/bottleneck_block/.../conv2d_N/kernel``, ``projection_head/nl_J/...``,
  ``head_supervised/linear_layer/dense_N/...``). Reading that graph needs no model code and traces
  no functions, so a large model loads as fast as its bytes.

How layers are matched. Neither format names a backbone layer by its place in the network: the
counters N of ``conv2d_N`` and ``batch_normalization_N`` number the layers in the order the authors'
``resnet.py`` creates them -- the stem's convs, then per block its projection shortcut (first block
of a group only), its convs (the selective-kernel conv's three, in order) and its SE convs. So the
backbone's convs sorted by counter, and its batch norms sorted by counter, are matched one to one
with this model's convs and batch norms listed in that creation order (``backbone_layers``). Only the
order of the counters is used, so counters that do not start at 0 (Keras keeps counting across
models built in one process) are fine. The variables' shapes then say the architecture
(``infer_config``), and every shape is checked against the model's own (``map_official``). Kernels
need no transposes: TF convs are HWIO and dense kernels (in, out), as in Flax.

What is not model state and is dropped (``drop_training_state``): the optimiser's ``/Momentum``
slots, ``global_step``, moving-average copies of the weights (``.../ExponentialMovingAverage``,
``ema_model/...``) and, in TF2 checkpoints, everything under the ``optimizer`` object and every slot
variable.

Numerics. The model reproduces the release's outputs (``initial_conv`` .. ``logits_sup``) to about
1e-6 relative in inference mode and 1e-5 in training mode (5e-5 for ``proj_head_output``: batch norm
over a 4-example batch amplifies float32 rounding, TF's as much as ours); ``initial_conv`` is the last
stem conv's output before its batch norm, as in the release.

Two release quirks are not reproduced: TF1's basic (ResNet-18/34) block with ``sk_ratio > 0`` feeds
its average-pooled input to the main branch too (TF2 fixed this; no such model was published), and
TF1's fine-tuning graph feeds the projection layers after ``ft_proj_selector`` from
``hiddens[ft_proj_selector]`` (it only builds them for checkpoint compatibility); here
``proj_head_output`` is always the whole head applied in sequence.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from simclrv2_jax.checkpoints import lineage
from simclrv2_jax.checkpoints.release_arch import CIFAR_IMAGE_SIZE, RELEASE_IMAGE_SIZE, infer_config
from simclrv2_jax.checkpoints.release_read import (
    BN_LEAVES,
    CONV_LEAVES,
    ConversionError,
    drop_training_state,
    parse_names,
    read_official,
    shape_of,
)
from simclrv2_jax.models.resnet import block_layout
from simclrv2_jax.models.simclr import SimCLRModel

__all__ = [
    "CIFAR_IMAGE_SIZE",
    "RELEASE_IMAGE_SIZE",
    "ConversionError",
    "backbone_layers",
    "build_model",
    "convert_to_workdir",
    "drop_training_state",
    "infer_config",
    "load_official",
    "map_official",
    "read_official",
    "release_config",
]

# ---------------------------------------------------------------------------------------------------
# The model and the mapping.


def build_model(config: Mapping[str, Any], dtype: Any = jnp.float32) -> SimCLRModel:
    """The ``SimCLRModel`` (head mode ``full``) of an ``infer_config`` result or a project config.

    ``full``: the whole projection head gives ``proj_head_output`` and the supervised head reads
    ``hiddens[ft_proj_selector]``, the released checkpoints' outputs.
    """
    return SimCLRModel(
        resnet_depth=config["resnet_depth"],
        width_multiplier=config["width_multiplier"],
        sk_ratio=config["sk_ratio"],
        se_ratio=config["se_ratio"],
        cifar_stem=config["image_size"] <= CIFAR_IMAGE_SIZE,
        block_counts=config.get("block_counts"),
        proj_head_mode=config["proj_head_mode"],
        num_proj_layers=config["num_proj_layers"],
        proj_out_dim=config["proj_out_dim"],
        ft_proj_selector=config["ft_proj_selector"],
        num_classes=config["num_classes"],
        head_mode="full",
        dtype=dtype,
    )


def backbone_layers(config: Mapping[str, Any]) -> list[tuple[str, tuple[str, ...]]]:
    """The backbone's ("conv" | "bn", Flax module path) in the order the authors' resnet.py creates them.

    That order is what numbers TF's ``conv2d_N`` and ``batch_normalization_N``: the stem's layers, then
    in each block the projection shortcut (conv, BN; first block of a group), the branch's convs and
    BNs in sequence (the SK conv's two-stream 3x3, BN, squeeze 1x1, BN, mixing 1x1) and the SE convs.
    """
    kind, counts = block_layout(config["resnet_depth"], config.get("block_counts"))
    sk = config["sk_ratio"] > 0
    se = config["se_ratio"] > 0
    layers: list[tuple[str, tuple[str, ...]]] = []

    def conv(*path: str) -> None:
        layers.append(("conv", ("backbone", *path)))

    def bn(*path: str) -> None:
        layers.append(("bn", ("backbone", *path, "bn")))  # BNReLU wraps its BatchNorm as "bn"

    stem_convs = 3 if sk and config["image_size"] > CIFAR_IMAGE_SIZE else 1
    for i in range(stem_convs):
        conv("stem", f"conv_{i}")
        bn("stem", f"bn_{i}")
    for group, count in enumerate(counts, start=1):
        for b in range(count):
            block = f"block_group{group}_{b}"
            if b == 0:
                conv(block, "shortcut", "conv")
                bn(block, "shortcut", "bn")
            conv(block, "conv_0")
            bn(block, "bn_0")
            if kind == "bottleneck":
                if sk:
                    conv(block, "sk_conv", "conv_0")
                    bn(block, "sk_conv", "bn_0")
                    conv(block, "sk_conv", "conv_1")
                    bn(block, "sk_conv", "bn_1")
                    conv(block, "sk_conv", "conv_2")
                else:
                    conv(block, "conv_1")
                    bn(block, "bn_1")
                conv(block, "conv_2")
                bn(block, "bn_2")
            else:
                conv(block, "conv_1")
                bn(block, "bn_1")
            if se:
                layers.append(("conv", ("backbone", block, "se", "conv_reduce")))
                layers.append(("conv", ("backbone", block, "se", "conv_expand")))
    return layers


def _model_shapes(model: SimCLRModel, config: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{(collection, *path): shape} of every model variable, from shapes only (nothing allocated)."""
    size = CIFAR_IMAGE_SIZE if config["image_size"] <= CIFAR_IMAGE_SIZE else 64
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    tree = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(str(k.key) for k in path): tuple(leaf.shape) for path, leaf in flat}


def map_official(weights: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """``{"params": ..., "batch_stats": ...}`` for ``build_model(config)`` from official variables.

    Every official variable is placed, and every model variable filled, with matching shapes; if not,
    one ``ConversionError`` lists the unknown variables (no place in the model), the missing ones
    (model variables the checkpoint lacks) and the shape mismatches. Values are float32 NumPy arrays;
    values that are not arrays (e.g. ``jax.ShapeDtypeStruct``, for checking a layout without the
    weights) are placed as they are.
    """
    weights = drop_training_state(weights)
    parsed = parse_names(weights)
    expected = _model_shapes(build_model(config), config)
    sources: dict[tuple[str, ...], str] = {}
    unknown = list(parsed.unknown)

    def place(name: str, module: tuple[str, ...], leaves: Mapping[str, tuple[str, str]], param: str) -> None:
        collection, leaf = leaves[param]
        target = (collection, *module, leaf)
        if target in expected:
            sources[target] = name
        else:
            unknown.append(name)

    order = backbone_layers(config)
    for kind, official in (("conv", parsed.convs), ("bn", parsed.bns)):
        modules = [path for k, path in order if k == kind]
        leaves = CONV_LEAVES if kind == "conv" else BN_LEAVES
        for layer, module in zip(official, modules):
            for param, name in layer.names.items():
                place(name, module, leaves, param)
        for layer in official[len(modules) :]:
            unknown.extend(layer.names.values())
    for j, parts in parsed.head.items():
        module = ("head_projection", f"layer_{j}")
        for param, name in parts.get("dense", {}).items():
            place(name, (*module, "dense"), CONV_LEAVES, param)
        for param, name in parts.get("batch_normalization", {}).items():
            place(name, (*module, "bn"), BN_LEAVES, param)
    for param, name in parsed.supervised.items():
        place(name, ("head_supervised", "dense"), CONV_LEAVES, param)

    missing = sorted("/".join(target) for target in expected if target not in sources)
    mismatched = [
        f"{name} {list(shape_of(weights[name]))} -> {'/'.join(target)} {list(expected[target])}"
        for target, name in sorted(sources.items())
        if shape_of(weights[name]) != expected[target]
    ]
    if unknown or missing or mismatched:
        problems = []
        for title, items in (
            ("unknown variables (no place in the model)", sorted(unknown)),
            ("missing variables (model variables the checkpoint lacks)", missing),
            ("shape mismatches", mismatched),
        ):
            if items:
                problems.append(f"{len(items)} {title}:\n  " + "\n  ".join(items))
        raise ConversionError(
            "The official checkpoint does not fit the model "
            f"({', '.join(f'{k}={config[k]}' for k in ('resnet_depth', 'width_multiplier', 'sk_ratio'))}):\n"
            + "\n".join(problems)
        )

    variables: dict[str, Any] = {}
    for target, name in sources.items():
        value = weights[name]
        if hasattr(value, "__array__"):
            value = np.asarray(value, dtype=np.float32)
        node = variables
        for key in target[:-1]:
            node = node.setdefault(key, {})
        node[target[-1]] = value
    return variables


def load_official(
    path: str | os.PathLike, ft_proj_selector: int | None = None
) -> tuple[SimCLRModel, dict[str, Any]]:
    """``(model, variables)`` for an official checkpoint (see ``read_official`` for the paths).

    ``model.apply(variables, images, train=False)`` with float32 NHWC images in [0, 1] returns the
    release's named outputs: ``initial_conv``, ``initial_max_pool``, ``block_group1..4``,
    ``final_avg_pool`` (= ``proj_head_input``), ``proj_head_output`` (the whole projection head) and
    ``logits_sup`` (the supervised head on ``hiddens[ft_proj_selector]``; absent without one).
    ``ft_proj_selector``: see ``infer_config``.
    """
    weights = read_official(path)
    config = infer_config(weights, ft_proj_selector)
    return build_model(config), map_official(weights, config)


# ---------------------------------------------------------------------------------------------------
# The command: an official checkpoint as a stage workdir of this project.


def release_config(arch: Mapping[str, Any]):
    """A full stage config for a converted checkpoint: the ``fields`` defaults, the data-set preset its
    stem suggests (ImageNet, or CIFAR-10 for the CIFAR stem) and the inferred architecture.

    The stage is ``finetune`` when there is a supervised head (so the workdir can serve as a
    distillation teacher), else ``pretrain``.
    """
    from simclrv2_jax import config as config_lib
    from simclrv2_jax.config import fields

    config = config_lib.get_config("finetune")
    fields.apply_dataset(config, "cifar10" if arch["image_size"] <= CIFAR_IMAGE_SIZE else "imagenet")
    config.stage = "finetune" if arch["num_classes"] else "pretrain"
    config.checkpoint = ""
    for key, value in arch.items():
        config[key] = tuple(value) if key == "block_counts" else value
    return config


def convert_to_workdir(source: str, workdir: str, ft_proj_selector: int | None = None) -> dict[str, Any]:
    """Writes the official checkpoint at ``source`` as a workdir of this project and returns its config.

    ``WORKDIR/checkpoints/0/`` holds ``params`` and ``batch_stats`` (Orbax) with the config beside
    them, and ``WORKDIR/config.json`` the config: what ``finetune --config.checkpoint=WORKDIR`` and
    ``distill --config.teacher_checkpoint=WORKDIR`` read (the architecture comes from this config).
    """
    import json

    from simclrv2_jax.checkpoints import Checkpointer
    from simclrv2_jax.checkpoints import workdir as workdir_lib

    weights = read_official(source)
    arch = infer_config(weights, ft_proj_selector)
    variables = map_official(weights, arch)
    config = release_config(arch)
    path = workdir_lib.prepare(workdir)
    if (path / "checkpoints").exists() and any((path / "checkpoints").iterdir()):
        raise ValueError(f"{workdir} already holds checkpoints; convert into an empty --workdir.")
    with workdir_lib.WorkdirLock(path, f"convert {source}"):
        checkpointer = Checkpointer(workdir, max_to_keep=1)
        checkpointer.save(0, {"params": variables["params"], "batch_stats": variables["batch_stats"]}, config)
        checkpointer.wait_until_finished()
        checkpointer.close()
        (path / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
        lineage.create(path, {})
        (path / "converted_from.json").write_text(
            json.dumps({"source": os.fspath(source), "variables": len(weights)}, indent=2)
        )
    return config.to_dict()
