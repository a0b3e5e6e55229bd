"""Micro-batches (``config.microbatches = K``): the global batch in K slices inside one jitted step.

Each device's share of the global batch is split into K micro-batches; micro-batch ``k`` holds slice
``k`` of every device's share, so that it is laid out over the devices as a whole batch is (each
device its own rows) and the model runs on one micro-batch at a time, each its own batch-norm
group(s). In the global layout the step reassembles, groups are ordered device-major then
micro-batch (group ``d * K + k``): exactly what ``K x D`` devices would hold, device ``j`` the
examples ``[j * b / K, (j + 1) * b / K)`` of the global batch's ``b``-example shares. So with
per-device BN (``global_bn=False``) one device with K micro-batches computes what K devices compute
with the same global batch; with ``global_bn=True`` on several devices BN is global across the
devices within each micro-batch.

Two ways to get the gradient:

* ``exact_gradients`` (pretraining: NT-Xent couples every example of the batch). Pass 1 runs the
  model on each micro-batch in training mode keeping only the outputs the loss reads (projections,
  the linear head's logits), no activations; the loss and its gradient with respect to all those
  outputs are taken once, over the whole global batch (negatives from every micro-batch of every
  device); pass 2 recomputes each micro-batch's forward under ``jax.vjp`` and backpropagates its
  slice of that cotangent, summing the parameter gradients. The result is the whole-batch gradient
  (to float rounding) for one extra forward pass.
* ``accumulated_gradients`` (fine-tuning, distillation: a mean of per-example terms): the gradient of
  each micro-batch's loss, averaged over the micro-batches; exact when every micro-batch holds the
  same number of counted examples (the training streams' batches are full).

Either way the BN moving statistics are those ``K x D`` per-device groups give: each micro-batch's
update starts from the same statistics and the updates are averaged, which, the update being linear
in the batch statistics, is the single update of the ``K x D`` groups' averaged statistics. The
weight-decay term and its gradient are added once, not per micro-batch. The parameters are gathered
once before the loops (fsdp) and their gradient handed back once after them. The loops are
``lax.scan`` loops, unrolled on the CPU backend (``UNROLL_ON_CPU``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from simclrv2_jax.config import flag
from simclrv2_jax.config.validation import largest_divisor_at_most
from simclrv2_jax.train.parallel import DATA_AXIS


def check_batch(batch_size: int, devices: int, microbatches: int, field: str = "train_batch_size") -> None:
    """A clear error unless ``batch_size`` splits into ``devices x microbatches`` equal parts."""
    parts = devices * microbatches
    if microbatches > 1 and batch_size % parts:
        lower = max(parts, batch_size // parts * parts)
        fewer = ""
        if batch_size % devices == 0:
            per_device = batch_size // devices
            k = largest_divisor_at_most(per_device, microbatches)
            fewer = f", or {flag('microbatches')}={k} (a divisor of the {per_device} examples per device)"
        raise ValueError(
            f"config.{field}={batch_size} does not split into {devices} device(s) x "
            f"config.microbatches={microbatches} equal micro-batches: it must be a multiple of {parts}. "
            f"Use {flag(field)}={lower} or {lower + parts}{fewer}."
        )


# XLA's CPU backend runs the backward pass's convolutions inside a loop 5-20x slower than outside one
# (measured on this project's tiny ResNet: a step in 4 micro-batches took 18x the plain step's time
# as a loop, 1.2x unrolled), so on the CPU the micro-batch loops are unrolled: the same arithmetic,
# K copies of the model in the program. Elsewhere they are loops: one micro-batch's buffers at a
# time, one body compiled. False keeps the loops on the CPU too (to compile for the memory an
# accelerator's program needs, or to test the loop form).
UNROLL_ON_CPU = True


def loop_unroll(k: int) -> int:
    """Micro-batches per step of the loops: all ``k`` on the CPU backend (see ``UNROLL_ON_CPU``), else 1."""
    return int(k) if UNROLL_ON_CPU and jax.default_backend() == "cpu" else 1


class Microbatches:
    """How a global batch splits into ``k`` micro-batches over ``devices`` devices and back.

    ``split`` takes every leaf ``[N, ...]`` to ``[k, N / k, ...]`` (micro-batch ``j`` = slice ``j``
    of each device's ``N / devices`` rows); ``join`` is its inverse on ``[k, M, ...]`` leaves.
    ``mesh``, when given, pins the micro-batches' rows to the ``data`` axis. ``unroll``: micro-batches
    per loop step (default ``loop_unroll(k)``).
    """

    def __init__(self, k: int, devices: int, mesh: Mesh | None = None, unroll: int | None = None):
        self.k, self.devices, self.mesh = int(k), int(devices), mesh
        self.unroll = loop_unroll(self.k) if unroll is None else int(unroll)

    def _pin(self, x: jax.Array) -> jax.Array:
        if self.mesh is None or self.mesh.devices.size <= 1:
            return x
        spec = PartitionSpec(None, DATA_AXIS, *([None] * (x.ndim - 2)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def split(self, tree: Any) -> Any:
        k, d = self.k, self.devices

        def one(x):
            n = x.shape[0]
            check_batch(n, d, k, field="train_batch_size")
            per = n // (d * k)
            y = x.reshape((d, k, per) + x.shape[1:]).swapaxes(0, 1)
            return self._pin(y.reshape((k, d * per) + x.shape[1:]))

        return jax.tree_util.tree_map(one, tree)

    def join(self, tree: Any) -> Any:
        d = self.devices

        def one(x):
            k, m = x.shape[:2]
            x = self._pin(x)
            y = x.reshape((k, d, m // d) + x.shape[2:]).swapaxes(0, 1)
            return y.reshape((k * m,) + x.shape[2:])

        return jax.tree_util.tree_map(one, tree)


def mean_update(start: Any, stacked: Any) -> Any:
    """The average of ``k`` updates of ``start`` (leaves ``[k, ...]``), as ``start`` plus the mean
    change: statistics that no micro-batch moves (BN in inference mode) stay exactly as they were."""
    return jax.tree_util.tree_map(
        lambda s, u: (s + jnp.mean(u - s[None], axis=0)).astype(s.dtype), start, stacked
    )


def changed_leaves(before: dict, after: dict) -> dict:
    """The entries of ``after`` that ``model_inputs`` added or replaced (by identity)."""
    return {k: v for k, v in after.items() if before.get(k) is not v}


Forward = Callable[[Any, jax.Array], tuple[dict, Any]]  # (params, images) -> (outputs, batch_stats)


def model_forward(model, batch_stats: Any, names: tuple[str, ...] = ()) -> Forward:
    """``model`` in training mode from ``batch_stats``: ``(outputs, new batch_stats)``, the outputs
    cut to ``names`` when given (what pass 1 keeps of each micro-batch)."""

    def forward(params, images):
        outputs, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
        )
        if names:
            outputs = {name: outputs[name] for name in names}
        return outputs, updates["batch_stats"]

    return forward


def run_forward(forward: Forward, params: Any, micro: dict, model_inputs, extra: tuple, unroll: int = 1):
    """Pass 1 alone: ``(outputs, batch, batch_stats)`` of every micro-batch, stacked ``[k, ...]``.

    ``outputs`` holds what ``forward`` keeps, ``batch`` the entries ``model_inputs`` made for each
    micro-batch (e.g. the labels laid out as the views are), ``batch_stats`` each micro-batch's update.
    """

    def body(_, mbatch):
        images, made = model_inputs(mbatch, *extra)
        outputs, stats = forward(params, images)
        return None, (outputs, changed_leaves(mbatch, made), stats)

    _, stacked = jax.lax.scan(body, None, micro, unroll=unroll)
    return stacked


def exact_gradients(
    forward: Forward,
    objective: Callable[[dict, dict, Any], tuple[jax.Array, dict]],
    params: Any,
    batch_stats: Any,
    batch: dict,
    micro: dict,
    model_inputs,
    extra: tuple,
    mb: Microbatches,
    loss_batch: dict | None = None,
) -> tuple[Any, Any, dict]:
    """``(grads, batch_stats, metrics)`` of ``objective`` over the whole batch, in two passes.

    ``forward(params, images) -> (outputs, batch_stats)`` keeps only the outputs the loss reads;
    ``objective(outputs, batch, params) -> (total, metrics)`` is the loss plus weight decay on the
    reassembled global outputs; ``loss_batch`` adds entries the loss reads that are not per-example
    (the memory queue).
    """
    outputs, made, stats = run_forward(forward, params, micro, model_inputs, extra, mb.unroll)
    whole = {**batch, **mb.join(made), **(loss_batch or {})}
    grad_fn = jax.value_and_grad(objective, argnums=(0, 2), has_aux=True)
    (_, metrics), (cotangent, direct) = grad_fn(mb.join(outputs), whole, params)
    cotangents = mb.split(cotangent)

    def backward(total, xs):
        mbatch, cot = xs
        images, _ = model_inputs(mbatch, *extra)
        _, vjp = jax.vjp(lambda p: forward(p, images)[0], params)
        (grads,) = vjp(cot)
        return jax.tree_util.tree_map(jnp.add, total, grads), None

    grads, _ = jax.lax.scan(backward, direct, (micro, cotangents), unroll=mb.unroll)
    return grads, mean_update(batch_stats, stats), metrics


def accumulated_gradients(
    forward: Forward,
    loss_fn: Callable[[dict, dict, Any], tuple[jax.Array, dict]],
    params: Any,
    batch_stats: Any,
    micro: dict,
    model_inputs,
    extra: tuple,
    mb: Microbatches,
) -> tuple[jax.Array, Any, Any, dict]:
    """``(loss, grads, batch_stats, metrics)``: ``loss_fn``'s value, gradient and metrics averaged
    over the micro-batches (no weight decay: the caller adds it once)."""

    def body(total, mbatch):
        images, mbatch = model_inputs(mbatch, *extra)

        def objective(p):
            outputs, stats = forward(p, images)
            loss, metrics = loss_fn(outputs, mbatch, p)
            return loss, (stats, metrics)

        (loss, (stats, metrics)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return jax.tree_util.tree_map(jnp.add, total, grads), (loss, stats, metrics)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    summed, (losses, stats, metrics) = jax.lax.scan(body, zeros, micro, unroll=mb.unroll)
    grads = jax.tree_util.tree_map(lambda g: g / mb.k, summed)
    metrics = jax.tree_util.tree_map(lambda m: jnp.mean(m, axis=0), metrics)
    return jnp.mean(losses), grads, mean_update(batch_stats, stats), metrics
