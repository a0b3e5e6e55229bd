"""TrainState and the pieces every stage's step shares.

The state holds arrays only (the optimiser and the model are closed over by the step function), so
Orbax saves and restores it as a plain pytree. The RNG is stored as raw key data; each step derives
its key with ``fold_in(rng, step)``, so a resumed run draws exactly the numbers an uninterrupted run
would.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
import tensorflow as tf

from simclrv2_jax import losses


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # raw key data (uint32[2]) so that checkpoints hold plain arrays

    def step_key(self) -> jax.Array:
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)

    def apply_gradients(self, grads: Any, tx: optax.GradientTransformation, batch_stats: Any) -> "TrainState":
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                            batch_stats=batch_stats, opt_state=opt_state)


def create_train_state(init_variables: Callable[[jax.Array], dict], tx: optax.GradientTransformation,
                       seed: int) -> TrainState:
    key = jax.random.key(seed)
    init_key, state_key = jax.random.split(key)
    variables = init_variables(init_key)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      rng=jax.random.key_data(state_key))


@dataclasses.dataclass
class Task:
    """What a stage gives the shared loop.

    ``train_step(state, batch, *extra) -> (state, metrics)`` and ``eval_step(state, batch, *extra)
    -> sums`` are pure and get jitted by the loop; ``extra`` holds arrays the step reads but does not
    own (the distillation teacher). ``eval_step`` returns per-batch *sums* plus ``count``; the loop
    divides the summed values by the summed ``count``. ``initialize(state)`` fills a fresh state
    from an earlier stage's checkpoint and runs only when the workdir has no checkpoint to resume.
    """

    name: str
    config: ml_collections.ConfigDict
    total_steps: int
    init_variables: Callable[[jax.Array], dict]
    tx: optax.GradientTransformation
    train_step: Callable[..., tuple[TrainState, dict]]
    train_data: Callable[[int], tf.data.Dataset]
    eval_step: Callable[..., dict] | None = None
    eval_data: Callable[[], tf.data.Dataset] | None = None
    initialize: Callable[[TrainState], TrainState] | None = None
    extra: tuple = ()
    extra_shardings: tuple = ()
    info: dict = dataclasses.field(default_factory=dict)  # written to results.json (data sizes, ...)


def classification_eval_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Summed top-1 / top-5 hits and cross-entropy over the real (mask 1) examples of a batch."""
    mask = mask.astype(jnp.float32)
    k = min(5, logits.shape[-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return {
        "top1": jnp.sum(losses.topk_correct(logits, labels, 1) * mask),
        "top5": jnp.sum(losses.topk_correct(logits, labels, k) * mask),
        "loss": jnp.sum(ce * mask),
        "count": jnp.sum(mask),
    }
