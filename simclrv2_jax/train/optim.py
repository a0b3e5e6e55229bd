"""Optimisers, parameter masks and learning-rate schedules of SimCLRv2.

Parameter naming convention (fixed by the model code, Flax Linen param trees of nested dicts):
  * weights that receive weight decay and the LARS trust ratio are leaves named `kernel` whose path
    does not pass through a module named `head_supervised`;
  * BatchNorm parameters are every leaf named `scale` (only normalisation layers have one) and the
    leaves named `bias` whose parent module's name contains `bn` or `BatchNorm` (the model names
    its BN modules `bn`; Flax's default name for `nn.BatchNorm` is `BatchNorm_<i>`);
  * dense / conv biases are leaves named `bias`.
The official release selects variables by the substrings 'batch_normalization', 'bias' and
'head_supervised' of their TF names; the rules above pick out the same sets in a Flax tree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from simclrv2_jax.config.fields import LR_SCALINGS, OPTIMIZERS
from simclrv2_jax.models.block_stack import is_stacked_path

PyTree = Any
SUPERVISED_HEAD = "head_supervised"
PROJECTION_HEAD = "head_projection"


def get_train_steps(num_examples: int, train_epochs: float, batch_size: int, train_steps: int = 0) -> int:
    """Number of optimiser steps: `train_steps` if given (> 0), else epochs * examples // B + 1."""
    if train_steps and train_steps > 0:
        return int(train_steps)
    return int(num_examples * train_epochs // batch_size + 1)


def scaled_learning_rate(base_learning_rate: float, batch_size: int, scaling: str) -> float:
    """'linear': lr * B / 256 (Goyal et al.); 'sqrt': lr * sqrt(B) (SimCLR's choice for LARS)."""
    if scaling == "linear":
        return base_learning_rate * batch_size / 256.0
    if scaling == "sqrt":
        return base_learning_rate * math.sqrt(batch_size)
    raise ValueError(f"Unknown learning_rate_scaling {scaling!r}; expected one of {LR_SCALINGS}.")


def learning_rate_schedule(
    *,
    base_learning_rate: float,
    batch_size: int,
    num_examples: int,
    learning_rate_scaling: str,
    warmup_epochs: float,
    total_steps: int,
) -> optax.Schedule:
    """Linear warmup from 0 then cosine decay to 0, as the official release computes it.

    warmup_steps = int(round(warmup_epochs * num_examples // batch_size)); during warmup
    lr(step) = step / warmup_steps * scaled_lr, so the very first step uses lr 0. From warmup_steps
    on,
    lr(step) = scaled_lr * 0.5 * (1 + cos(pi * min(step - warmup_steps, D) / D)) with
    D = total_steps - warmup_steps (tf.train.cosine_decay with alpha 0), i.e. the cosine spans only
    the steps after warmup and reaches 0 at total_steps, staying there afterwards. D is clamped to at
    least 1 so a warmup as long as the run does not divide by zero.
    """
    scaled_lr = scaled_learning_rate(base_learning_rate, batch_size, learning_rate_scaling)
    warmup_steps = int(round(warmup_epochs * num_examples // batch_size))
    decay_steps = max(int(total_steps) - warmup_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        if warmup_steps > 0:
            warmup_lr = step / warmup_steps * scaled_lr
        else:
            warmup_lr = jnp.asarray(scaled_lr, jnp.float32)
        progress = jnp.clip(step - warmup_steps, 0.0, decay_steps) / decay_steps
        cosine_lr = scaled_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup_steps, warmup_lr, cosine_lr).astype(jnp.float32)

    return schedule


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _path_names(path: tuple) -> tuple[str, ...]:
    return tuple(_key_name(e) for e in path)


def decay_mask(params: PyTree) -> PyTree:
    """Same-structure tree of bools: True for weights that get weight decay and the trust ratio.

    Those are the `kernel` leaves outside the supervised head. BN parameters, biases and the
    supervised head are excluded from both (the head gets an L2 term in the loss instead, see
    `weight_decay_loss`).
    """

    def is_decayed(path, _):
        names = _path_names(path)
        return names[-1] == "kernel" and SUPERVISED_HEAD not in names[:-1]

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def _is_batch_norm_param(names: tuple[str, ...]) -> bool:
    if names[-1] == "scale":
        return True
    if names[-1] == "bias" and len(names) > 1:
        parent = names[-2]
        return "bn" in parent or "BatchNorm" in parent
    return False


def lars(
    learning_rate: float | optax.Schedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    trust_coefficient: float = 0.001,
    mask: PyTree | Callable[[PyTree], PyTree] = decay_mask,
) -> optax.GradientTransformation:
    """LARS as in the official SimCLR release (classic momentum, no Nesterov).

    Per variable w with gradient g: g += wd * w where decayed; trust = eeta * ||w|| / ||g|| where
    adapted and both norms > 0, else 1; v = momentum * v + lr * trust * g; w -= v.

    This is `optax.lars`'s chain (checked against optax 0.2.8's source), with its state: it chains
    add_decayed_weights -> masked trust ratio (norm of the *decayed* gradient, same zero-norm
    fallback to 1, eps 0) -> scale by -lr(count) -> trace(momentum). optax's trace holds -v, so
    updates and parameters agree term by term, including a learning rate that changes per step,
    since lr multiplies the gradient before it enters the trace, as in the official code. The same
    mask drives decay and trust ratio, as the official exclusion lists are the same.

    The one change is ``layerwise_trust_ratio``: the weights of scanned blocks (``scan_blocks``)
    are stacked, one block per row, and each row gets its own trust ratio, as the block's variable
    does in the unrolled model. On an unstacked tree it is exactly ``optax.scale_by_trust_ratio``.
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=mask),
        optax.masked(layerwise_trust_ratio(trust_coefficient=trust_coefficient), mask=mask),
        optax.scale_by_learning_rate(learning_rate),
        optax.trace(decay=momentum, nesterov=False),
    )


def layerwise_trust_ratio(trust_coefficient: float = 0.001) -> optax.GradientTransformation:
    """LARS's trust ratio ``eeta * ||w|| / ||g||`` (1 where either norm is 0), per layer.

    A leaf under a ``block_group{g}_scan`` module holds one block's variable per row (leading
    axis), so its norms are taken per row; every other leaf is one layer, normed whole.
    """

    def update(updates, state, params):
        if params is None:
            raise ValueError("layerwise_trust_ratio needs the parameters")

        def scale(path, g, w):
            if is_stacked_path(path) and w.ndim > 1:
                # Summed over every axis but the rows' (no reshape: that would undo an fsdp split).
                axes = tuple(range(1, w.ndim))
                w_norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=axes, keepdims=True))
                g_norm = jnp.sqrt(jnp.sum(jnp.square(g), axis=axes, keepdims=True))
            else:
                w_norm, g_norm = optax.safe_norm(w, 0.0), optax.safe_norm(g, 0.0)
            ratio = trust_coefficient * w_norm / g_norm
            ratio = jnp.where((w_norm == 0.0) | (g_norm == 0.0), jnp.array(1.0, dtype=w.dtype), ratio)
            return g * ratio

        return jax.tree_util.tree_map_with_path(scale, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(
    *,
    optimizer: str,
    learning_rate: float | optax.Schedule,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """Builds the optimiser named by the config field `optimizer`.

    Args:
      optimizer: 'lars' (weight decay inside the optimiser, on `decay_mask` leaves), 'momentum'
        (SGD with Nesterov momentum, as the official tf.train.MomentumOptimizer(use_nesterov=True)) or
        'adam'. For the latter two, weight decay belongs in the loss (`weight_decay_loss`).
      learning_rate: a float or an optax schedule (evaluated at the optimiser's step count).
      momentum: momentum of 'lars' and 'momentum'.
      weight_decay: used by 'lars' only.
    """
    if optimizer == "lars":
        return lars(learning_rate, momentum=momentum, weight_decay=weight_decay)
    if optimizer == "momentum":
        return optax.sgd(learning_rate, momentum=momentum, nesterov=True)
    if optimizer == "adam":
        return optax.adam(learning_rate)
    raise ValueError(f"Unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}.")


def trainable_mask(fine_tune_after_block: int, train_proj_head: bool = True) -> Callable[[PyTree], PyTree]:
    """Params tree -> bool tree, True where a param is trainable under ``fine_tune_after_block``.

    -1 trains everything; 0 freezes the backbone's stem; k in 1..4 the stem and block groups 1..k.
    The supervised head always trains; the projection-head layers kept for fine-tuning only with
    ``train_proj_head`` (the TF1 release leaves them out of the trained variables).
    """
    frozen_prefixes = []
    if fine_tune_after_block >= 0:
        frozen_prefixes.append("stem")
    frozen_prefixes += [f"block_group{g}_" for g in range(1, fine_tune_after_block + 1)]

    def trainable(params):
        def leaf(path, _):
            names = _path_names(path)
            if names[0] == PROJECTION_HEAD:
                return train_proj_head
            if names[0] != "backbone":
                return True
            return not any(names[1].startswith(p) for p in frozen_prefixes)

        return jax.tree_util.tree_map_with_path(leaf, params)

    return trainable


def freeze(
    tx: optax.GradientTransformation, trainable: Callable[[PyTree], PyTree]
) -> optax.GradientTransformation:
    """``tx`` on the params where ``trainable(params)`` is True; the others get zero updates.

    The updates are zeroed *after* the optimiser, so LARS weight decay cannot move frozen params.
    """

    def labels(params):
        return jax.tree_util.tree_map(lambda t: "train" if t else "frozen", trainable(params))

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def weight_decay_loss(params: PyTree, *, weight_decay: float, optimizer: str) -> jax.Array:
    """The L2 term added to the loss, as the official `add_weight_decay`.

    'lars' decays the backbone and projection head itself, so the loss only carries
    weight_decay * sum(||k||^2 / 2) over the supervised head's kernels. Other optimisers have no
    decay of their own: every parameter except BatchNorm's (see the module docstring) is decayed
    through the loss, biases included, as the official code does.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}.")

    def term(path, leaf):
        names = _path_names(path)
        if optimizer == "lars":
            keep = names[-1] == "kernel" and SUPERVISED_HEAD in names[:-1]
        else:
            keep = not _is_batch_norm_param(names)
        if not keep:
            return jnp.zeros([], jnp.float32)
        return 0.5 * jnp.sum(jnp.square(leaf.astype(jnp.float32)))

    terms = jax.tree_util.tree_leaves(jax.tree_util.tree_map_with_path(term, params))
    return weight_decay * sum(terms, jnp.zeros([], jnp.float32))


def global_norm(tree: PyTree) -> jax.Array:
    """sqrt of the sum of squares of every leaf (float32), e.g. for logging gradient norms."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(
        sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves), jnp.zeros([], jnp.float32))
    )


def all_finite(tree: PyTree) -> jax.Array:
    """One boolean: every floating-point element of ``tree`` is finite (integer leaves are ignored)."""
    checks = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)
