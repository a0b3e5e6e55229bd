"""Losses and accuracy helpers for the three SimCLRv2 stages: pure functions on global arrays.

The train step is jitted over a `jax.sharding.Mesh` whose 'data' axis shards the batch dimension, so
every array here is the *global* batch. A loss written on the global batch is therefore already the
cross-device loss: the negatives of NT-Xent are all 2N examples of every device, exactly as the
official release's cross-replica gather gives, and the result does not depend on the device count.

All losses compute in float32 whatever the activation dtype, so that bf16 models keep an accurate
softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def _batch_mesh(x: Array, axis: str | None) -> jax.sharding.AbstractMesh | None:
    """The mesh that carries `axis`, from x's type (jit over sharded inputs) or the mesh context."""
    if axis is None:
        return None
    mesh = jax.typeof(x).sharding.mesh
    if mesh.empty:
        mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis not in mesh.axis_names:
        return None
    return mesh


def _is_explicit(mesh: jax.sharding.AbstractMesh, axis: str) -> bool:
    return mesh.axis_types[mesh.axis_names.index(axis)] == jax.sharding.AxisType.Explicit


def _constrain_rows(x: Array, mesh_axis: str | None) -> Array:
    """Keeps the rows of `x` sharded over `mesh_axis` when x lives on a mesh with that axis.

    Without the hint XLA may choose to replicate the [N, N] logits on every device, which costs
    N^2 memory per device at large batch; with it each device holds only its anchors' rows, as in the
    official per-replica computation. Off a mesh (single device, plain arrays) it is skipped.
    """
    mesh = _batch_mesh(x, mesh_axis)
    if mesh is None:
        return x
    sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(mesh_axis, *([None] * (x.ndim - 1)))
    )
    if _is_explicit(mesh, mesh_axis):
        # Under Explicit axes the sharding is part of the type; `reshard` is the way to set it.
        return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


def _replicate(x: Array, mesh_axis: str | None) -> Array:
    """Gathers `x` onto every device under Explicit axes (all anchors' partners, every device's rows).

    Explicit axes refuse a matmul of two operands sharded along the same axis on different
    dimensions; gathering the right-hand side states the intended algorithm (local anchors against
    all examples). Under Auto axes XLA's partitioner makes that choice itself, so nothing is done.
    """
    mesh = _batch_mesh(x, mesh_axis)
    if mesh is None or not _is_explicit(mesh, mesh_axis):
        return x
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    # Same guard as tf.math.l2_normalize (rsqrt of max(sum_sq, eps)), so a zero row stays finite.
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def _masked_mean(values: Array, mask: Array | None) -> Array:
    """Mean of `values` weighted by `mask`; a batch with no valid example gives 0, not NaN."""
    values = values.astype(jnp.float32)
    if mask is None:
        return jnp.mean(values)
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def nt_xent_loss(
    z: Array,
    *,
    temperature: float,
    hidden_norm: bool = True,
    large_num: float = 1e9,
    mesh_axis: str | None = None,
    memory: Array | None = None,
    memory_valid: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """NT-Xent contrastive loss of SimCLR over the global batch, optionally with a memory of negatives.

    Args:
      z: [2N, d] projections; rows [:N] are view A and rows [N:] view B of the same N examples
        (row i and row N + i are a positive pair).
      temperature: softmax temperature tau.
      hidden_norm: L2-normalise z first (cosine similarity), as the paper does.
      large_num: subtracted from an example's similarity with itself so it never counts as a
        negative; 1e9 as in the official release.
      mesh_axis: name of the batch mesh axis (e.g. 'data'). When z lives on a mesh with that axis
        (from its sharding or the `jax.set_mesh` context) the logits rows are kept sharded over it,
        and under Explicit axes the other view is gathered explicitly. Ignored off a mesh.
      memory: optional [K, d] queue of earlier projections (already L2-normalised when
        ``hidden_norm``; no gradient flows into it). Each anchor of both directions also meets every
        entry as a negative: its logits ``z memory^T / tau`` join the softmax's denominator. ``None``
        gives exactly the loss without memory.
      memory_valid: optional [K] bool; entries that are False (slots not yet filled) are left out
        (``-large_num``). Default: every entry counts.

    Returns:
      (loss, aux): loss = mean over the N examples of (loss_a + loss_b), the sum of both directions
      as in the official release; aux['contrast_acc'] is the fraction of view-A anchors whose argmax
      over logits_ab is their positive, aux['contrast_entropy'] the mean entropy of softmax(logits_ab)
      (the two metrics the official release logs).
    """
    if z.ndim != 2 or z.shape[0] % 2:
        raise ValueError(f"nt_xent_loss expects z of shape [2N, d], got {z.shape}.")
    n = z.shape[0] // 2
    z = z.astype(jnp.float32)
    if hidden_norm:
        z = l2_normalize(z)
    za, zb = z[:n], z[n:]
    za_all, zb_all = _replicate(za, mesh_axis), _replicate(zb, mesh_axis)
    za, zb = _constrain_rows(za, mesh_axis), _constrain_rows(zb, mesh_axis)
    inv_t = 1.0 / temperature
    eye = jnp.eye(n, dtype=jnp.float32)
    hp = jax.lax.Precision.HIGHEST  # default TPU/GPU matmul precision would round z to bf16/tf32

    def scaled_dot(rows: Array, cols: Array, exclude_self: bool) -> Array:
        logits = jnp.matmul(rows, cols.T, precision=hp) * inv_t
        if exclude_self:
            logits = logits - large_num * eye
        return _constrain_rows(logits, mesh_axis)

    logits_ab = scaled_dot(za, zb_all, exclude_self=False)
    logits_aa = scaled_dot(za, za_all, exclude_self=True)
    logits_bb = scaled_dot(zb, zb_all, exclude_self=True)
    logits_ba = scaled_dot(zb, za_all, exclude_self=False)

    # The positive of anchor i sits at column i of logits_ab (and of logits_ba): the diagonal. It is
    # read with an eye mask rather than jnp.diagonal, a gather that Explicit sharding cannot resolve
    # on row-sharded logits.
    pos_ab = jnp.sum(logits_ab * eye, axis=1)
    pos_ba = jnp.sum(logits_ba * eye, axis=1)
    parts_a, parts_b = [logits_ab, logits_aa], [logits_ba, logits_bb]
    if memory is not None:
        queue = jax.lax.stop_gradient(memory.astype(jnp.float32))
        if memory_valid is not None:
            # Empty slots take -large_num (as the self-similarity does): exp underflows to exactly 0.
            off = large_num * jnp.logical_not(memory_valid).astype(jnp.float32)[None, :]
        else:
            off = 0.0
        parts_a.append(_constrain_rows(jnp.matmul(za, queue.T, precision=hp) * inv_t - off, mesh_axis))
        parts_b.append(_constrain_rows(jnp.matmul(zb, queue.T, precision=hp) * inv_t - off, mesh_axis))
    lse_a = jax.nn.logsumexp(jnp.concatenate(parts_a, axis=1), axis=1)
    lse_b = jax.nn.logsumexp(jnp.concatenate(parts_b, axis=1), axis=1)
    loss = jnp.mean((lse_a - pos_ab) + (lse_b - pos_ba))

    labels = jnp.arange(n)
    contrast_acc = jnp.mean((jnp.argmax(logits_ab, axis=1) == labels).astype(jnp.float32))
    log_prob_ab = jax.nn.log_softmax(logits_ab, axis=1)
    contrast_entropy = -jnp.mean(jnp.sum(jnp.exp(log_prob_ab) * log_prob_ab, axis=1))
    aux = {
        "contrast_acc": jax.lax.stop_gradient(contrast_acc),
        "contrast_entropy": jax.lax.stop_gradient(contrast_entropy),
    }
    return loss, aux


def supervised_cross_entropy(
    logits: Array,
    labels: Array,
    mask: Array | None = None,
    num_classes: int | None = None,
) -> Array:
    """Mean softmax cross-entropy over the examples with mask 1.

    Args:
      logits: [B, C].
      labels: [B] integer class ids, or [B, C] one-hot / soft targets.
      mask: optional [B] weights (1 = a real example, 0 = padding); the result is
        sum(mask * ce) / max(sum(mask), 1), so an all-padding batch gives 0.
      num_classes: only checked against the logits' last dimension, for a clearer error.
    """
    logits = logits.astype(jnp.float32)
    if num_classes is not None and logits.shape[-1] != num_classes:
        raise ValueError(
            f"supervised_cross_entropy: logits have {logits.shape[-1]} classes, num_classes={num_classes}."
        )
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    if labels.ndim == logits.ndim:
        ce = -jnp.sum(labels.astype(jnp.float32) * log_probs, axis=-1)
    else:
        ce = -jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return _masked_mean(ce, mask)


def distillation_loss(
    student_logits: Array,
    teacher_logits: Array,
    *,
    temperature: float,
    mask: Array | None = None,
) -> Array:
    """tau^2 * -sum_y P_T(y|x; tau) log P_S(y|x; tau), averaged over the masked examples.

    The tau^2 factor (Hinton et al.) keeps the gradient's size the same at every temperature; the
    release's distillation colabs (TF1 and TF2) both apply it. At the paper's tau = 1 it is 1.
    The teacher is wrapped in stop_gradient so no gradient can reach a teacher that shares
    parameters with the student (self-distillation).
    """
    teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    teacher_probs = jax.nn.softmax(teacher / temperature, axis=-1)
    student_log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    per_example = -jnp.sum(teacher_probs * student_log_probs, axis=-1) * (temperature**2)
    return _masked_mean(per_example, mask)


def topk_correct(logits: Array, labels: Array, k: int) -> Array:
    """[B] float32, 1.0 where the label is among the k largest logits.

    Ties go to the lower class index (as argmax does), not to the label: with a zero-initialised
    head every logit is equal, and counting ties as hits would report 100% accuracy.
    Labels may be [B] ids or [B, C] one-hot targets.
    """
    if labels.ndim == logits.ndim:
        labels = jnp.argmax(labels, axis=-1)
    _, top_idx = jax.lax.top_k(logits.astype(jnp.float32), k)
    return jnp.any(top_idx == labels[..., None].astype(top_idx.dtype), axis=-1).astype(jnp.float32)


def accuracy(logits: Array, labels: Array, mask: Array | None = None) -> Array:
    """Top-1 accuracy over the masked examples (0 when the mask is empty)."""
    return _masked_mean(topk_correct(logits, labels, 1), mask)


def classification_eval_sums(logits: Array, labels: Array, mask: Array) -> dict[str, Array]:
    """Summed top-1 / top-5 hits and cross-entropy over the real (mask 1) examples of a batch.

    Sums, not means, so that an evaluation pass adds them over batches and divides once by the
    summed ``count``: exact over the split whatever the padding of the last batch.
    """
    mask = mask.astype(jnp.float32)
    k = min(5, logits.shape[-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return {
        "top1": jnp.sum(topk_correct(logits, labels, 1) * mask),
        "top5": jnp.sum(topk_correct(logits, labels, k) * mask),
        "loss": jnp.sum(ce * mask),
        "count": jnp.sum(mask),
    }
