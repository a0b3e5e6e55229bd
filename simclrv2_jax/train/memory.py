"""A MoCo-style memory of negatives for pretraining (``memory_size > 0``): SimCLRv2's third change.

SimCLRv2 "incorporates the memory mechanism from MoCo": a memory network, whose weights are a moving
average of the encoder's, projects every batch, and its outputs are kept in a queue where later
batches meet them as extra negatives. The paper finds about +1% linear-evaluation top-1 at small
batch sizes and little at batch 4096 (the batch already supplies 8,190 negatives per anchor); the
authors did not release this part, so it is written here from the paper and from MoCo.

What one train step does, in this order (MoCo's order):

1. ``ema <- m * ema + (1 - m) * params`` with ``m = moco_momentum``, from the parameters the step
   starts with (so at step 0 the memory network equals the encoder). BN statistics are not averaged:
   the memory network runs in training mode, normalising with the batch's statistics as MoCo's key
   encoder does, and keeps its own moving statistics from those batches.
2. The memory network projects the step's views (no gradient); the projections are L2-normalised
   when ``hidden_norm`` (the loss compares cosine similarities).
3. NT-Xent of the online projections over the global batch, as without memory (the positive of an
   anchor is the online projection of its other view), plus every filled queue slot as a negative of
   every anchor, in both directions (``losses.nt_xent_loss(memory=...)``). Empty slots are masked
   out, so the first steps are exactly memory-free NT-Xent rather than contrasted against noise.
4. The step's ``2N`` memory projections enter the queue, oldest out: a ring buffer written at
   ``ptr, ptr + 1, ...`` (mod ``memory_size``) in the loss's row order -- view A of the global
   batch's examples in order, then view B -- so the queue's content is the same whatever the number
   of devices or processes. With micro-batches (``config.microbatches``) the memory network runs
   on one micro-batch at a time, each its own BN group as for the online network, and the whole
   global batch's keys are put back in that order and enqueued once per step.

The memory network's weights follow the parameters' layout (split under ``param_sharding=fsdp``);
the queue (``memory_size x proj_out_dim`` float32, 32 MiB at 65,536 x 128) is replicated like the BN
statistics. All of it lives in ``TrainState.memory`` and travels with every checkpoint, so a resumed
run continues bit for bit. The finite-state guard covers it with the rest of the state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from simclrv2_jax.train import losses


@dataclasses.dataclass(frozen=True)
class MomentumMemory:
    """The memory of one pretraining run: sizes, momentum, and how to read keys off the model."""

    size: int  # queue slots (memory_size)
    momentum: float  # moco_momentum
    key_dim: int  # the projection's width (proj_out_dim)
    hidden_norm: bool  # store L2-normalised projections, as the loss compares them
    keys_of: Callable[[dict], jax.Array]  # model outputs -> [2N, d] rows in the loss's order

    def init(self, variables: dict) -> dict:
        """The memory at step 0: the memory network = the encoder, an empty queue."""
        return {
            "params": jax.tree_util.tree_map(jnp.asarray, variables["params"]),
            "batch_stats": jax.tree_util.tree_map(jnp.asarray, variables.get("batch_stats", {})),
            "queue": jnp.zeros((self.size, self.key_dim), jnp.float32),
            "queue_ptr": jnp.zeros((), jnp.int32),  # the next slot to write
            "queue_filled": jnp.zeros((), jnp.int32),  # slots written so far (at most size)
        }

    def valid(self, memory: dict) -> jax.Array:
        """[size] bool: the slots holding a projection."""
        return jnp.arange(self.size) < memory["queue_filled"]

    def advance(
        self, model, memory: dict, params: Any, images: jax.Array | None, gather=None, forward=None
    ) -> tuple[dict, jax.Array]:
        """Steps 1-2: the moved memory network and its keys ``[2N, d]`` for this step's ``images``.

        ``params`` are the encoder's parameters in their stored layout (the same layout as
        ``memory["params"]``); ``gather`` makes whole parameters of them for the forward pass.
        ``forward(variables) -> (outputs, batch_stats)`` runs the memory network instead of
        ``model`` on ``images`` in training mode (the micro-batched step: one micro-batch at a time,
        the outputs of the whole global batch and the averaged statistics back).
        """
        m = self.momentum
        ema = jax.tree_util.tree_map(
            lambda e, p: (m * e + (1.0 - m) * p.astype(e.dtype)).astype(e.dtype), memory["params"], params
        )
        whole = gather(ema) if gather is not None else ema
        variables = {"params": whole, "batch_stats": memory["batch_stats"]}
        if forward is not None:
            outputs, batch_stats = forward(variables)
        else:
            outputs, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
            batch_stats = updates["batch_stats"]
        keys = jax.lax.stop_gradient(self.keys_of(outputs).astype(jnp.float32))
        if self.hidden_norm:
            keys = losses.l2_normalize(keys)
        return {**memory, "params": ema, "batch_stats": batch_stats}, keys

    def push(self, memory: dict, keys: jax.Array) -> dict:
        """Step 4: ``keys`` into the ring buffer at ``queue_ptr``, in row order, oldest overwritten."""
        n = keys.shape[0]
        if n > self.size:
            raise ValueError(f"memory_size={self.size} is smaller than the {n} projections of one step.")
        slots = (memory["queue_ptr"] + jnp.arange(n)) % self.size
        queue = memory["queue"].at[slots].set(keys.astype(memory["queue"].dtype), unique_indices=True)
        return {
            **memory,
            "queue": queue,
            "queue_ptr": (memory["queue_ptr"] + n) % self.size,
            "queue_filled": jnp.minimum(memory["queue_filled"] + n, self.size),
        }
