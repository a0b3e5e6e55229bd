"""Reading the authors' released checkpoints: variables by their TensorFlow names, optimiser state
dropped, names parsed into backbone convs and batch norms (by creation counter), projection-head layers
and the supervised head. See ``checkpoints.release`` for the whole conversion."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_TRAINING_STATE_PARTS = frozenset({"Momentum", "ExponentialMovingAverage"})
_OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
# What a TF2 training checkpoint (``tf.train.Checkpoint(model=..., global_step=optimizer.iterations,
# optimizer=...)``, the release's run.py) holds beside the model at its root: training state.
_ROOT_TRAINING_STATE = frozenset({"optimizer", "global_step", "save_counter"})
# How long a remote source (gs://...) may take to answer before the converter gives up.
REMOTE_TIMEOUT_S = 30.0

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
CONV_LEAVES = {"kernel": ("params", "kernel"), "bias": ("params", "bias")}
BN_LEAVES = {
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

    path = os.fspath(path)
    if "://" in path:
        gfile = tf.io.gfile
        if not path_readable(path, REMOTE_TIMEOUT_S, lambda p: gfile.exists(p) or gfile.exists(p + ".index")):
            raise ConversionError(
                f"{path} cannot be read within {REMOTE_TIMEOUT_S:g} s: no network, no credentials for it, "
                "or no such object. Check the path (gsutil ls) or copy the checkpoint to a local folder."
            )
    prefix = _checkpoint_prefix(tf, path)
    try:
        reader = tf.train.load_checkpoint(prefix)
        keys = reader.get_variable_to_shape_map()
        if _OBJECT_GRAPH_KEY in keys:
            names = _object_graph_names(reader)
        else:
            names = {key: key for key in keys}
        weights = {name: reader.get_tensor(key) for name, key in drop_training_state(names).items()}
    except ConversionError:
        raise
    except Exception as e:  # TF's readers raise OpError, ValueError or IndexError on a damaged file
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConversionError(
            f"The checkpoint at {prefix} does not read ({type(e).__name__}: {first}): a truncated or "
            "damaged file? Copy it again from its source."
        ) from None
    if not weights:
        raise ConversionError(f"{prefix} holds no model variables.")
    return {name: np.asarray(value) for name, value in weights.items()}


def _checkpoint_prefix(tf: Any, path: str) -> str:
    """The checkpoint prefix ``tf.train.load_checkpoint`` reads, for any of ``read_official``'s paths."""
    gfile = tf.io.gfile
    if gfile.exists(path + ".index"):
        return path
    if gfile.exists(path) and not gfile.isdir(path):
        hint = ""
        match = re.match(r"^(.*)\.(index|data-\d+-of-\d+)$", path)
        if match and gfile.exists(match.group(1) + ".index"):
            hint = f" Pass the checkpoint's prefix: --source={match.group(1)}."
        raise ConversionError(
            f"{path} is a file, not a TensorFlow checkpoint: pass a TF1 checkpoint prefix (model.ckpt-N, "
            f"beside its .index), the folder holding it, or a TF2 SavedModel folder.{hint}"
        )
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

    Walks the graph from its root, leaving out the training state at the root
    (``_ROOT_TRAINING_STATE``) and slot variables, so only the model's variables remain (each once,
    however many objects track it).
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
            if node_id == 0 and child.local_name in _ROOT_TRAINING_STATE:
                continue
            if child.node_id not in seen and child.node_id not in slots:
                seen.add(child.node_id)
                stack.append(child.node_id)
    return names


# ---------------------------------------------------------------------------------------------------
# Parsing names.


@dataclass
class NamedLayer:
    """One official layer: its counter (creation rank) and {official param: variable name}."""

    counter: int
    prefix: str  # the layer's name, e.g. base_model/conv2d_3
    names: dict[str, str] = field(default_factory=dict)


@dataclass
class ParsedNames:
    convs: list[NamedLayer]
    bns: list[NamedLayer]
    head_kind: str | None  # "nl" (nonlinear), "l" (linear) or None (no projection head)
    head: dict[int, dict[str, dict[str, str]]]  # layer -> {"dense"|"batch_normalization": {param: name}}
    supervised: dict[str, str]
    unknown: list[str]


def parse_names(weights: Mapping[str, Any]) -> ParsedNames:
    convs: dict[int, NamedLayer] = {}
    bns: dict[int, NamedLayer] = {}
    head: dict[int, dict[str, dict[str, str]]] = {}
    head_kinds = set()
    supervised: dict[str, str] = {}
    unknown = []
    for name in sorted(weights):
        if match := _BACKBONE_RE.match(name):
            kind, counter, param = match.groups()
            valid = CONV_LEAVES if kind == "conv2d" else BN_LEAVES
            if param not in valid:
                unknown.append(name)
                continue
            layers = convs if kind == "conv2d" else bns
            prefix = name.rsplit("/", 1)[0]
            layer = layers.setdefault(int(counter or 0), NamedLayer(int(counter or 0), prefix))
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
    return ParsedNames(
        convs=[convs[k] for k in sorted(convs)],
        bns=[bns[k] for k in sorted(bns)],
        head_kind=head_kinds.pop() if head_kinds else None,
        head=head,
        supervised=supervised,
        unknown=unknown,
    )


def shape_of(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in np.shape(value))


def unknown_error(names: list[str]) -> ConversionError:
    listed = "\n  ".join(names)
    return ConversionError(
        f"{len(names)} variable(s) of the checkpoint are not SimCLRv2 model variables:\n  {listed}"
    )


def path_readable(path: str, timeout_s: float = 20.0, exists=None) -> bool:
    """Whether ``path`` exists and can be read (``tf.io.gfile.exists``), answered within ``timeout_s``.

    A remote path (``gs://...``) without network, or without a way to authenticate, can make the
    file system retry for minutes; the check runs in a daemon thread and counts as "no" when it has
    not answered in time, or raised. ``exists`` replaces ``tf.io.gfile.exists`` (tests).
    """
    if exists is None:
        from simclrv2_jax.data.tf_cpu import tf

        exists = tf.io.gfile.exists
    answer: list[bool] = []

    def check() -> None:
        try:
            answer.append(bool(exists(path)))
        except Exception:  # any failure to read is a "no"; the caller falls back
            answer.append(False)

    thread = threading.Thread(target=check, name="path_readable", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(answer and answer[0])
