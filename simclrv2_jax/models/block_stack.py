"""The two layouts of a ResNet's weights: one entry per block, or each group's repeated blocks stacked.

With ``scan_blocks`` (``models/resnet.py``) a block group's blocks after the first run as one scanned
loop, and their variables live under one name with a new leading axis::

    unrolled: backbone/block_group3_1/conv_0/kernel ... backbone/block_group3_35/conv_0/kernel
    stacked:  backbone/block_group3_scan/block/conv_0/kernel   (shape (35, ...))

Block ``i`` of the group is row ``i - 1`` of the stack; ``block_group{g}_0`` (the block with the
projection shortcut) is the same in both. The functions here convert any tree that holds such
entries at any depth (params, BN statistics, optimiser slots, a whole train state) from one layout
to the other, so a checkpoint written in either layout loads into a model of either layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

_UNROLLED = re.compile(r"^block_group(\d+)_(\d+)$")
_STACKED = re.compile(r"^block_group(\d+)_scan$")
BODY = "block"  # the scanned body's only child (``resnet._Repeated``)


def _resharded(sharding: Any, stacked: bool) -> Any:
    """A row's NamedSharding for its stack (the leading axis never split), or the other way."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec)
    spec = (None,) + spec if stacked else spec[1:]
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def _stack(leaves: list[Any]) -> Any:
    if all(isinstance(x, np.ndarray | np.generic) for x in leaves):
        return np.stack(leaves)
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
        first = leaves[0]
        sharding = _resharded(getattr(first, "sharding", None), True)
        return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype, sharding=sharding)
    return jnp.stack(leaves)


def _row(leaf: Any, i: int) -> Any:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        sharding = _resharded(getattr(leaf, "sharding", None), False)
        return jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype, sharding=sharding)
    return leaf[i]


def _rebuild(node: Any, new_items: dict) -> Any:
    if isinstance(node, dict):
        return new_items
    try:  # FrozenDict and other mappings that take a dict
        return type(node)(new_items)
    except TypeError:
        return new_items


def _map(node: Any, convert_mapping) -> Any:
    """Applies ``convert_mapping`` to every mapping in ``node``, innermost first."""
    if isinstance(node, Mapping):
        items = {k: _map(v, convert_mapping) for k, v in node.items()}
        return _rebuild(node, convert_mapping(items))
    if isinstance(node, tuple) and hasattr(node, "_fields"):  # a NamedTuple (optax states)
        return type(node)(*(_map(v, convert_mapping) for v in node))
    if isinstance(node, tuple | list):
        return type(node)(_map(v, convert_mapping) for v in node)
    if hasattr(node, "__dataclass_fields__") and hasattr(node, "replace"):  # flax.struct dataclasses
        fields = {f: _map(getattr(node, f), convert_mapping) for f in node.__dataclass_fields__}
        return node.replace(**fields)
    return node


def _stack_mapping(items: dict) -> dict:
    groups: dict[int, list[int]] = {}
    for key in items:
        m = _UNROLLED.match(str(key))
        if m and int(m.group(2)) >= 1:
            groups.setdefault(int(m.group(1)), []).append(int(m.group(2)))
    if not groups:
        return items
    out = {}
    for key, value in items.items():
        m = _UNROLLED.match(str(key))
        if not (m and int(m.group(2)) >= 1):
            out[key] = value
    for group, indices in sorted(groups.items()):
        indices.sort()
        if indices != list(range(1, len(indices) + 1)):
            raise ValueError(f"block_group{group} has blocks {indices}; expected 1..{len(indices)} in a row")
        blocks = [items[f"block_group{group}_{i}"] for i in indices]
        structure = jax.tree_util.tree_structure(blocks[0])
        for i, block in zip(indices, blocks):
            if jax.tree_util.tree_structure(block) != structure:
                raise ValueError(f"block_group{group}_{i} is built unlike block_group{group}_1; cannot stack")
        leaves = [jax.tree_util.tree_leaves(b) for b in blocks]
        stacked = [_stack(list(column)) for column in zip(*leaves)]
        out[f"block_group{group}_scan"] = {BODY: jax.tree_util.tree_unflatten(structure, stacked)}
    return out


def _unstack_mapping(items: dict) -> dict:
    if not any(_STACKED.match(str(k)) for k in items):
        return items
    out = {}
    for key, value in items.items():
        m = _STACKED.match(str(key))
        if not m:
            out[key] = value
            continue
        body = value[BODY]
        leaves, structure = jax.tree_util.tree_flatten(body)
        length = int(leaves[0].shape[0])
        for i in range(length):
            out[f"block_group{m.group(1)}_{i + 1}"] = jax.tree_util.tree_unflatten(
                structure, [_row(x, i) for x in leaves]
            )
    return out


def stack(tree: Any) -> Any:
    """``tree`` with each group's ``block_group{g}_{i}`` (i >= 1) stacked into ``block_group{g}_scan``."""
    return _map(tree, _stack_mapping)


def unstack(tree: Any) -> Any:
    """The inverse of ``stack``: one ``block_group{g}_{i}`` entry per block."""
    return _map(tree, _unstack_mapping)


def is_stacked_path(path: tuple) -> bool:
    """True for a leaf (given by its jax key path) under a ``block_group{g}_scan`` entry."""
    return any(_STACKED.match(str(getattr(k, "key", getattr(k, "name", k)))) for k in path)


def is_stacked(tree: Any) -> bool:
    """True if any mapping in ``tree`` has a ``block_group{g}_scan`` entry."""
    found = []

    def look(items: dict) -> dict:
        found.extend(k for k in items if _STACKED.match(str(k)))
        return items

    _map(tree, look)
    return bool(found)


def has_blocks(tree: Any) -> bool:
    """True if ``tree`` holds any residual block of either layout beyond a group's first."""
    found = []

    def look(items: dict) -> dict:
        for k in items:
            m = _UNROLLED.match(str(k))
            if _STACKED.match(str(k)) or (m and int(m.group(2)) >= 1):
                found.append(k)
        return items

    _map(tree, look)
    return bool(found)


def to_layout(tree: Any, stacked: bool) -> Any:
    """``tree`` in the stacked (``True``) or unrolled (``False``) layout, whichever it is in now."""
    if stacked:
        return stack(tree) if not is_stacked(tree) else tree
    return unstack(tree) if is_stacked(tree) else tree


def like(tree: Any, target: Any) -> Any:
    """``tree`` in the layout of ``target`` (a tree of the same model, e.g. abstract shapes)."""
    if not has_blocks(target):
        return tree
    return to_layout(tree, is_stacked(target))
