"""Import the authors' published SimCLRv2 checkpoints into this project's ``SimCLRModel``.

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
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from simclrv2_jax.fields import SK_RATIO, base_config
from simclrv2_jax.models.resnet import BLOCK_SPECS, block_layout
from simclrv2_jax.models.simclr import SimCLRModel

# The resolution the released models were trained at; any size > 32 builds the same network.
RELEASE_IMAGE_SIZE = 224
CIFAR_IMAGE_SIZE = 32

_TRAINING_STATE_PARTS = frozenset({"Momentum", "ExponentialMovingAverage"})
_OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"

# TF2 models trained with global_bn name their batch norms ``sync_batch_normalization_N``.
_BACKBONE_RE = re.compile(
    r"^(?:base_model|resnet)/(?:.+/)?(conv2d|(?:sync_)?batch_normalization)(?:_(\d+))?/"
    r"(kernel|bias|gamma|beta|moving_mean|moving_variance)$"
)
_HEAD_RE = re.compile(
    r"^(?:head_contrastive|projection_head)/(nl|l)_(\d+)/(?:.+/)?(dense|(?:sync_)?batch_normalization)(?:_\d+)?/"
    r"(kernel|gamma|beta|moving_mean|moving_variance)$"
)
_SUPERVISED_RE = re.compile(r"^head_supervised/linear_layer/dense(?:_\d+)?/(kernel|bias)$")

# Official parameter name -> (Flax collection, leaf name).
_CONV_LEAVES = {"kernel": ("params", "kernel"), "bias": ("params", "bias")}
_BN_LEAVES = {
    "gamma": ("params", "scale"),
    "beta": ("params", "bias"),
    "moving_mean": ("batch_stats", "mean"),
    "moving_variance": ("batch_stats", "var"),
}


class ConversionError(ValueError):
    """An official checkpoint that does not fit the model: unknown, missing or misshapen variables."""


# ---------------------------------------------------------------------------------------------------
# Reading.


def drop_training_state(weights: Mapping[str, Any]) -> dict[str, Any]:
    """The model's variables only: without optimiser slots, ``global_step`` and moving-average copies.

    A training checkpoint holds a ``/Momentum`` slot beside every trainable variable (LARS and
    momentum SGD), the step counter and, when the run kept one, exponential moving averages of the
    weights (``.../ExponentialMovingAverage``, or a whole ``ema_model/base_model/...`` copy in some
    released TF1 checkpoints); none of them is the trained network's weight.
    """
    kept = {}
    for name, value in weights.items():
        parts = name.split("/")
        if parts[0] == "ema_model" or parts[-1] == "global_step" or _TRAINING_STATE_PARTS.intersection(parts):
            continue
        kept[name] = value
    return kept


def read_official(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The model variables of an official checkpoint, by their TensorFlow names, as NumPy arrays.

    ``path``: a TF1 checkpoint prefix (``.../model.ckpt-N``) or the folder holding it (the newest
    checkpoint there is read), a TF2 SavedModel folder (holding ``saved_model.pb`` and
    ``variables/``) or a TF2 object-based checkpoint. ``gs://`` and other TensorFlow file systems work.
    Optimiser state is dropped (``drop_training_state``). TensorFlow runs on the CPU only.
    """
    from simclrv2_jax.data.tf_cpu import tf

    prefix = _checkpoint_prefix(tf, os.fspath(path))
    reader = tf.train.load_checkpoint(prefix)
    keys = reader.get_variable_to_shape_map()
    if _OBJECT_GRAPH_KEY in keys:
        names = _object_graph_names(reader)
    else:
        names = {key: key for key in keys}
    weights = {name: reader.get_tensor(key) for name, key in drop_training_state(names).items()}
    if not weights:
        raise ConversionError(f"{prefix} holds no model variables.")
    return {name: np.asarray(value) for name, value in weights.items()}


def _checkpoint_prefix(tf: Any, path: str) -> str:
    """The checkpoint prefix ``tf.train.load_checkpoint`` reads, for any of ``read_official``'s paths."""
    gfile = tf.io.gfile
    if gfile.exists(path + ".index"):
        return path
    if not gfile.isdir(path):
        raise FileNotFoundError(f"No checkpoint at {path}: neither {path}.index nor a folder exists.")
    folder = path.rstrip("/")
    if any(gfile.exists(f"{folder}/{name}") for name in ("saved_model.pb", "saved_model.pbtxt")):
        prefix = f"{folder}/variables/variables"
        if not gfile.exists(prefix + ".index"):
            raise FileNotFoundError(f"SavedModel {folder} has no variables/variables.index.")
        return prefix
    latest = tf.train.latest_checkpoint(folder)
    if latest:
        return latest
    # No (or a stale) ``checkpoint`` state file: take the highest-numbered checkpoint in the folder.
    indexes = gfile.glob(f"{folder}/*.index")
    if indexes:

        def step(index: str) -> int:
            match = re.search(r"-(\d+)\.index$", index)
            return int(match.group(1)) if match else -1

        return max(indexes, key=step)[: -len(".index")]
    raise FileNotFoundError(f"No checkpoint in {folder}: no saved_model.pb, checkpoint file or *.index.")


def _object_graph_names(reader: Any) -> dict[str, str]:
    """{variable name at saving time: checkpoint key} from a TF2 checkpoint's object graph.

    Walks the graph from its root, leaving out the ``optimizer`` branch and slot variables, so only
    the model's variables remain (each once, however many objects track it).
    """
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor(_OBJECT_GRAPH_KEY))
    slots = {slot.slot_variable_node_id for node in graph.nodes for slot in node.slot_variables}
    names: dict[str, str] = {}
    seen = {0}
    stack = [0]
    while stack:
        node_id = stack.pop()
        node = graph.nodes[node_id]
        for attribute in node.attributes:
            if attribute.name != "VARIABLE_VALUE" or not attribute.full_name:
                continue
            name = attribute.full_name.removesuffix(":0")
            if names.setdefault(name, attribute.checkpoint_key) != attribute.checkpoint_key:
                raise ConversionError(f"Two different variables are both named {name!r} in the checkpoint.")
        for child in node.children:
            if node_id == 0 and child.local_name == "optimizer":
                continue
            if child.node_id not in seen and child.node_id not in slots:
                seen.add(child.node_id)
                stack.append(child.node_id)
    return names


# ---------------------------------------------------------------------------------------------------
# Parsing names.


@dataclass
class _Layer:
    """One official layer: its counter (creation rank) and {official param: variable name}."""

    counter: int
    prefix: str  # the layer's name, e.g. base_model/conv2d_3
    names: dict[str, str] = field(default_factory=dict)


@dataclass
class _Parsed:
    convs: list[_Layer]
    bns: list[_Layer]
    head_kind: str | None  # "nl" (nonlinear), "l" (linear) or None (no projection head)
    head: dict[int, dict[str, dict[str, str]]]  # layer -> {"dense"|"batch_normalization": {param: name}}
    supervised: dict[str, str]
    unknown: list[str]


def _parse(weights: Mapping[str, Any]) -> _Parsed:
    convs: dict[int, _Layer] = {}
    bns: dict[int, _Layer] = {}
    head: dict[int, dict[str, dict[str, str]]] = {}
    head_kinds = set()
    supervised: dict[str, str] = {}
    unknown = []
    for name in sorted(weights):
        if match := _BACKBONE_RE.match(name):
            kind, counter, param = match.groups()
            valid = _CONV_LEAVES if kind == "conv2d" else _BN_LEAVES
            if param not in valid:
                unknown.append(name)
                continue
            layers = convs if kind == "conv2d" else bns
            prefix = name.rsplit("/", 1)[0]
            layer = layers.setdefault(int(counter or 0), _Layer(int(counter or 0), prefix))
            if layer.prefix != prefix:
                raise ConversionError(f"Two backbone layers have the same counter: {layer.prefix}, {prefix}.")
            layer.names[param] = name
        elif match := _HEAD_RE.match(name):
            prefix, index, kind, param = match.groups()
            if (kind == "dense") != (param == "kernel"):
                unknown.append(name)
                continue
            head_kinds.add(prefix)
            kind = "dense" if kind == "dense" else "batch_normalization"
            head.setdefault(int(index), {}).setdefault(kind, {})[param] = name
        elif match := _SUPERVISED_RE.match(name):
            supervised[match.group(1)] = name
        else:
            unknown.append(name)
    if len(head_kinds) > 1:
        raise ConversionError("The checkpoint has both linear (l_0) and nonlinear (nl_J) projection layers.")
    return _Parsed(
        convs=[convs[k] for k in sorted(convs)],
        bns=[bns[k] for k in sorted(bns)],
        head_kind=head_kinds.pop() if head_kinds else None,
        head=head,
        supervised=supervised,
        unknown=unknown,
    )


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in np.shape(value))


def _unknown_error(names: list[str]) -> ConversionError:
    listed = "\n  ".join(names)
    return ConversionError(
        f"{len(names)} variable(s) of the checkpoint are not SimCLRv2 model variables:\n  {listed}"
    )


# ---------------------------------------------------------------------------------------------------
# The architecture from the shapes.


@dataclass
class _Conv:
    name: str
    shape: tuple[int, ...]
    has_bias: bool


class _ConvReader:
    """Reads the backbone's convs in creation order, checking each against the expected shape."""

    def __init__(self, convs: list[_Conv]):
        self.convs = convs
        self.i = 0

    def peek(self) -> _Conv | None:
        return self.convs[self.i] if self.i < len(self.convs) else None

    def take(self, what: str, kernel: int, cin: int | None, cout: int | None) -> _Conv:
        conv = self.peek()
        ok = (
            conv is not None
            and conv.shape[:2] == (kernel, kernel)
            and (cin is None or conv.shape[2] == cin)
            and (cout is None or conv.shape[3] == cout)
        )
        if not ok:
            want = [kernel, kernel, "?" if cin is None else cin, "?" if cout is None else cout]
            got = "nothing" if conv is None else f"{conv.name} {list(conv.shape)}"
            raise ConversionError(
                f"Cannot read the backbone's layout: expected the {what} conv {want} next, found {got}."
            )
        self.i += 1
        return conv


def _ratio(pairs: list[tuple[int, int]], floor: int, preferred: float | None) -> float:
    """A ratio r with ``max(int(f * r), floor) == width`` for every (f, width): the release's rule."""

    def fits(r: float) -> bool:
        return all(max(int(f * r), floor) == width for f, width in pairs)

    if preferred is not None and fits(preferred):
        return preferred
    lo = max((width / f for f, width in pairs if width > floor), default=0.0)
    hi = min((width + 1) / f if width > floor else (floor + 1) / f for f, width in pairs)
    for candidate in (lo, (lo + hi) / 2):
        if candidate > 0 and fits(candidate):
            return candidate
    raise ConversionError(f"No single ratio gives the widths {pairs} (filters, width) of these layers.")


def _infer_backbone(convs: list[_Conv]) -> dict[str, Any]:
    """Stem, width, block kind, blocks per group, SK and SE from the convs' shapes."""
    if not convs:
        raise ConversionError("The checkpoint has no backbone convolutions (base_model/... or resnet/...).")
    reader = _ConvReader(convs)
    first = convs[0].shape
    second = convs[1].shape if len(convs) > 1 else None
    if first[:2] == (7, 7):
        stem = "imagenet"
        width_channels = reader.take("7x7 stem", 7, 3, None).shape[3]
    elif second is not None and second[:2] == (3, 3) and second[2] == first[3]:
        stem = "resnet_d"  # three 3x3 convs, the SK models' stem
        half = reader.take("first ResNet-D stem", 3, 3, None).shape[3]
        reader.take("second ResNet-D stem", 3, half, half)
        width_channels = reader.take("third ResNet-D stem", 3, half, 2 * half).shape[3]
    else:
        stem = "cifar"
        width_channels = reader.take("3x3 CIFAR stem", 3, 3, None).shape[3]
    # The first block's projection shortcut is 1x1; a bottleneck block goes on with a 1x1 conv, a
    # basic block with a 3x3.
    after = convs[reader.i + 1].shape if reader.i + 1 < len(convs) else None
    kind = "basic" if after is not None and after[:2] == (3, 3) else "bottleneck"
    expansion = 4 if kind == "bottleneck" else 1

    counts, sk_pairs, se_pairs = [], [], []
    cin = width_channels
    for group in range(1, 5):
        filters = width_channels * 2 ** (group - 1)
        out = expansion * filters
        blocks = 0
        while True:
            where = f"block group {group}, block {blocks}"
            if blocks == 0:
                reader.take(f"projection shortcut ({where})", 1, cin, out)
            if kind == "bottleneck":
                reader.take(f"first 1x1 ({where})", 1, cin if blocks == 0 else out, filters)
                nxt = reader.peek()
                if nxt is not None and nxt.shape == (3, 3, filters, 2 * filters):
                    reader.take(f"SK two-stream 3x3 ({where})", 3, filters, 2 * filters)
                    mid = reader.take(f"SK squeeze ({where})", 1, filters, None).shape[3]
                    reader.take(f"SK mixing ({where})", 1, mid, 2 * filters)
                    sk_pairs.append((filters, mid))
                else:
                    reader.take(f"3x3 ({where})", 3, filters, filters)
                reader.take(f"last 1x1 ({where})", 1, filters, out)
            else:
                reader.take(f"first 3x3 ({where})", 3, cin if blocks == 0 else out, filters)
                reader.take(f"second 3x3 ({where})", 3, filters, filters)
            nxt = reader.peek()
            if nxt is not None and nxt.has_bias:
                reduced = reader.take(f"SE reduce ({where})", 1, out, None).shape[3]
                reader.take(f"SE expand ({where})", 1, reduced, out)
                se_pairs.append((filters, reduced))
            blocks += 1
            nxt = reader.peek()
            start = (1, 1, out, filters) if kind == "bottleneck" else (3, 3, out, filters)
            if nxt is None or nxt.shape != start or nxt.has_bias:
                break
        counts.append(blocks)
        cin = out
    if reader.peek() is not None:
        extra = ", ".join(f"{c.name} {list(c.shape)}" for c in convs[reader.i :])
        raise ConversionError(f"Backbone convs left over after four block groups: {extra}.")

    if kind == "bottleneck" and (stem == "resnet_d") != bool(sk_pairs) and stem != "cifar":
        raise ConversionError(
            "The ResNet-D stem and the selective-kernel convs go together in the release (sk_ratio > 0); "
            "this checkpoint has one without the other."
        )
    if kind == "bottleneck" and sk_pairs and len(sk_pairs) != sum(counts):
        raise ConversionError("Only some bottleneck blocks have selective-kernel convs.")
    if se_pairs and len(se_pairs) != sum(counts):
        raise ConversionError("Only some blocks have squeeze-and-excitation convs.")
    if sk_pairs:
        sk_ratio = _ratio(sk_pairs, 32, SK_RATIO)
    else:
        # Basic blocks have no SK convs: the ResNet-D stem is what says sk_ratio > 0. (With a CIFAR stem
        # a basic-block SK model differs only in its shortcuts' pooling, which has no variables.)
        sk_ratio = SK_RATIO if stem == "resnet_d" else 0.0
    se_ratio = _ratio(se_pairs, 1, None) if se_pairs else 0.0

    depth = (3 if kind == "bottleneck" else 2) * sum(counts) + 2
    standard = BLOCK_SPECS.get(depth) == (kind, tuple(counts))
    return dict(
        resnet_depth=depth,
        block_counts=None if standard else tuple(counts),
        width_multiplier=width_channels / 64,
        sk_ratio=sk_ratio,
        se_ratio=se_ratio,
        cifar_stem=stem == "cifar",
        features=cin,
    )


def infer_config(weights: Mapping[str, Any], ft_proj_selector: int | None = None) -> dict[str, Any]:
    """This project's config fields for an official checkpoint's variables (name -> array or shape).

    Returns ``resnet_depth``, ``width_multiplier``, ``sk_ratio``, ``se_ratio``, ``proj_head_mode``,
    ``num_proj_layers``, ``proj_out_dim``, ``ft_proj_selector``, ``num_classes`` (0: no supervised
    head) and ``image_size``: 32 for a CIFAR stem, else 224, the released models' resolution (the
    variables only say whether the size is <= 32: any larger size builds the same network). When the
    blocks per group are not those of a standard depth, ``block_counts`` is added and
    ``resnet_depth`` is the layer count ``3 * blocks + 2`` (bottleneck) or ``2 * blocks + 2`` (basic).

    ``ft_proj_selector``: which of ``hiddens = [h, head layer 1, ...]`` the supervised head reads.
    Neither format records it; the supervised kernel's input width decides it when only one hidden
    has that width. Otherwise (a 3-layer head whose middle layers keep the backbone's width) it must
    be given; a given value that does not fit the kernel's width is an error.
    """
    parsed = _parse(drop_training_state(weights))
    if parsed.unknown:
        raise _unknown_error(parsed.unknown)
    no_kernel = [
        name for layer in parsed.convs if "kernel" not in layer.names for name in layer.names.values()
    ]
    if no_kernel:
        raise ConversionError(f"Backbone conv variables without a kernel: {no_kernel}.")
    convs = [
        _Conv(layer.names["kernel"], _shape(weights[layer.names["kernel"]]), "bias" in layer.names)
        for layer in parsed.convs
    ]
    backbone = _infer_backbone(convs)
    defaults = base_config("finetune")

    # Projection head.
    layers = sorted(parsed.head)
    if layers != list(range(len(layers))):
        raise ConversionError(f"Projection head layers {layers} are not numbered 0..{len(layers) - 1}.")
    dims = [backbone["features"]]
    for j in layers:
        dense = parsed.head[j].get("dense", {})
        if "kernel" not in dense:
            raise ConversionError(f"Projection head layer {j} has no dense kernel.")
        kernel = _shape(weights[dense["kernel"]])
        if kernel[0] != dims[-1]:
            raise ConversionError(
                f"Projection head layer {j}'s kernel {list(kernel)} does not take width {dims[-1]}."
            )
        dims.append(kernel[1])
    if parsed.head_kind is None:
        head_mode, num_layers, out_dim = "none", defaults.num_proj_layers, defaults.proj_out_dim
    elif parsed.head_kind == "l":
        if len(layers) != 1:
            raise ConversionError(
                f"A linear projection head has one layer (l_0); this one has {len(layers)}."
            )
        head_mode, num_layers, out_dim = "linear", defaults.num_proj_layers, dims[-1]
    else:
        head_mode, num_layers, out_dim = "nonlinear", len(layers), dims[-1]
        if any(d != dims[0] for d in dims[1:-1]):
            raise ConversionError(
                f"The middle projection layers must keep the backbone width; widths {dims}."
            )

    # Supervised head and the selector.
    num_classes, selector = 0, 0 if ft_proj_selector is None else ft_proj_selector
    if parsed.supervised:
        if "kernel" not in parsed.supervised:
            raise ConversionError("head_supervised has a bias but no kernel.")
        width, num_classes = _shape(weights[parsed.supervised["kernel"]])
        fits = [k for k, d in enumerate(dims) if d == width]
        if ft_proj_selector is not None:
            index = ft_proj_selector if ft_proj_selector >= 0 else len(dims) + ft_proj_selector
            if not 0 <= index < len(dims):
                raise ConversionError(
                    f"ft_proj_selector={ft_proj_selector} is out of range for hiddens of widths {dims}."
                )
            if dims[index] != width:
                raise ConversionError(
                    f"ft_proj_selector={ft_proj_selector} selects a hidden of width {dims[index]}, but the "
                    f"supervised head's kernel takes width {width} (selectors that fit: {fits})."
                )
        elif len(fits) == 1:
            selector = fits[0]
        elif not fits:
            raise ConversionError(f"The supervised head takes width {width}, which no hidden {dims} has.")
        else:
            raise ConversionError(
                f"The supervised head (width {width}) could read any of hiddens {fits} (widths {dims}); the "
                "checkpoint does not record which. Pass ft_proj_selector (0: the backbone output, what "
                "linear evaluation during pretraining reads by default; 1: the first head layer, "
                "SimCLRv2's fine-tuning choice)."
            )

    config = dict(
        resnet_depth=backbone["resnet_depth"],
        width_multiplier=backbone["width_multiplier"],
        sk_ratio=backbone["sk_ratio"],
        se_ratio=backbone["se_ratio"],
        proj_head_mode=head_mode,
        num_proj_layers=num_layers,
        proj_out_dim=out_dim,
        ft_proj_selector=selector,
        num_classes=num_classes,
        image_size=CIFAR_IMAGE_SIZE if backbone["cifar_stem"] else RELEASE_IMAGE_SIZE,
    )
    if backbone["block_counts"] is not None:
        config["block_counts"] = backbone["block_counts"]
    return config


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
    parsed = _parse(weights)
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
        leaves = _CONV_LEAVES if kind == "conv" else _BN_LEAVES
        for layer, module in zip(official, modules):
            for param, name in layer.names.items():
                place(name, module, leaves, param)
        for layer in official[len(modules) :]:
            unknown.extend(layer.names.values())
    for j, parts in parsed.head.items():
        module = ("head_projection", f"layer_{j}")
        for param, name in parts.get("dense", {}).items():
            place(name, (*module, "dense"), _CONV_LEAVES, param)
        for param, name in parts.get("batch_normalization", {}).items():
            place(name, (*module, "bn"), _BN_LEAVES, param)
    for param, name in parsed.supervised.items():
        place(name, ("head_supervised", "dense"), _CONV_LEAVES, param)

    missing = sorted("/".join(target) for target in expected if target not in sources)
    mismatched = [
        f"{name} {list(_shape(weights[name]))} -> {'/'.join(target)} {list(expected[target])}"
        for target, name in sorted(sources.items())
        if _shape(weights[name]) != expected[target]
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
    from simclrv2_jax import fields

    config = fields.get_config("finetune")
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

    from simclrv2_jax import workdir as workdir_lib
    from simclrv2_jax.checkpoints import Checkpointer

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
        (path / "converted_from.json").write_text(
            json.dumps({"source": os.fspath(source), "variables": len(weights)}, indent=2)
        )
    return config.to_dict()


def main(argv: list[str]) -> int:
    from absl import app, logging

    from simclrv2_jax.cli import run_reporting_user_errors, start_up

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    start_up()
    code, config = run_reporting_user_errors(
        convert_to_workdir, _SOURCE.value, _WORKDIR.value, _SELECTOR.value
    )
    if code == 0:
        arch = ", ".join(f"{k}={config[k]}" for k in ("resnet_depth", "width_multiplier", "sk_ratio"))
        logging.info("Converted %s into %s (%s)", _SOURCE.value, _WORKDIR.value, arch)
        print(
            f"Converted {_SOURCE.value} -> {_WORKDIR.value} ({arch}, {config['num_classes']} classes, "
            f"ft_proj_selector={config['ft_proj_selector']}). Fine-tune it with --config.checkpoint="
            f"{_WORKDIR.value}"
            + (
                f" or distill from it with --config.teacher_checkpoint={_WORKDIR.value}."
                if config["num_classes"]
                else "."
            )
        )
    return code


if __name__ == "__main__":
    from absl import app, flags

    _SOURCE = flags.DEFINE_string(
        "source", None, "TF1 checkpoint (model.ckpt-N or its folder) or TF2 SavedModel."
    )
    _WORKDIR = flags.DEFINE_string("workdir", None, "Where to write the converted workdir.")
    _SELECTOR = flags.DEFINE_integer(
        "ft_proj_selector", None, "Which hidden the supervised head reads, when the shapes cannot tell."
    )
    flags.mark_flags_as_required(["source", "workdir"])
    from simclrv2_jax.cli import parse_flags

    app.run(main, flags_parser=parse_flags)
