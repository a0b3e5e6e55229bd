"""TrainState: the arrays a run carries from step to step, and nothing else.

The optimiser and the model are closed over by the step function, so Orbax saves and restores the
state as a plain pytree. The RNG is stored as raw key data; each step derives its key with
``fold_in(rng, step)``, so a resumed run draws exactly the numbers an uninterrupted run would.

``skipped_steps`` counts the steps the finite-state guard refused to apply (non-finite loss,
gradients, parameters or BN statistics; see ``step.py``); it travels with the checkpoint so that a
resumed run keeps the same budget of skips.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # raw key data (uint32[2]) so that checkpoints hold plain arrays
    skipped_steps: jax.Array  # int32: non-finite steps skipped so far (above the limit: halted)
    # Pretraining's memory of negatives (train/memory.py): the memory network's weights and BN
    # statistics, the queue and its pointers. None without memory (no leaves: checkpoints unchanged).
    memory: Any = None

    def step_key(self) -> jax.Array:
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)

    def apply_gradients(self, grads: Any, tx: optax.GradientTransformation, batch_stats: Any) -> TrainState:
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        return self.replace(
            step=self.step + 1,
            params=optax.apply_updates(self.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )


def create_train_state(
    init_variables: Callable[[jax.Array], dict],
    tx: optax.GradientTransformation,
    seed: int,
    memory: Any = None,
) -> TrainState:
    """The state at step 0; ``memory`` (a ``train.memory.MomentumMemory``) adds its initial state."""
    key = jax.random.key(seed)
    init_key, state_key = jax.random.split(key)
    variables = init_variables(init_key)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=jax.random.key_data(state_key),
        skipped_steps=jnp.zeros((), jnp.int32),
        memory=memory.init(variables) if memory is not None else None,
    )
