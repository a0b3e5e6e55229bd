"""The train step and the classification eval step, written once for every stage.

A stage supplies only what differs: ``loss_fn(outputs, batch, params) -> (loss, metrics)`` on the
model's named outputs and, where the model input is not simply ``batch["image"]``, a
``model_inputs(batch, *extra) -> (images, batch)`` that runs outside the gradient (pretraining
stacks its two views; distillation adds the frozen teacher's logits to the batch). The factory adds
what every stage shares: the augmentation on the device when the stage asks for it
(``augment(batch, key)`` with the step's key ``fold_in(rng, step)``), the model applied in training
mode with mutable batch statistics, the optimiser's weight-decay term in the loss, the gradient,
``grad_norm`` and ``learning_rate`` in the metrics, and the update behind the finite-state guard.

The guard (``guarded_update``) checks on the device, inside the step, that the loss, the gradient
norm, the new parameters and the new BN statistics are all finite. A step that is not is never
applied: within the budget ``config.skip_nonfinite_steps`` it is skipped (the step counter moves
on, nothing else changes) and counted in ``state.skipped_steps``; past the budget (default 0: the
first one) the state halts -- it stays the last finite state, step counter included, and every
later step is a no-op -- and the metric ``halted`` tells the loop to stop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from simclrv2_jax.train import losses, optim
from simclrv2_jax.train.state import TrainState

LossFn = Callable[[dict, dict, Any], tuple[jax.Array, dict]]
ModelInputs = Callable[..., tuple[jax.Array, dict]]


def image_input(batch: dict, *extra: Any) -> tuple[jax.Array, dict]:
    """The default model input: the batch's images, the batch unchanged."""
    return batch["image"], batch


def make_train_step(
    model,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: ml_collections.ConfigDict,
    loss_fn: LossFn,
    model_inputs: ModelInputs = image_input,
    augment: Callable[[dict, jax.Array], dict] | None = None,
    layout: Any = None,
    memory: Any = None,
) -> Callable[..., tuple[TrainState, dict]]:
    """``train_step(state, batch, *extra) -> (state, metrics)`` minimising ``loss_fn`` + weight decay.

    ``metrics["loss"]`` is the whole objective (``loss_fn``'s loss plus ``weight_decay_loss``).
    ``layout`` (a ``parallel.ParamLayout``) says where the parameters live between steps: with
    sharded parameters the step gathers them for the forward and backward passes and returns each
    device its slice of the gradient, the optimiser then updating the slices.
    ``memory`` (a ``train.memory.MomentumMemory``, pretraining only) moves the memory network, hands
    ``loss_fn`` the queue as ``batch["memory_queue"]`` / ``batch["memory_valid"]``, and enqueues the
    step's memory projections after the loss.
    """
    gather = layout.gather if layout is not None else None

    def train_step(state: TrainState, batch: dict, *extra: Any) -> tuple[TrainState, dict]:
        if augment is not None:
            batch = augment(batch, state.step_key())
        images, batch = model_inputs(batch, *extra)
        if memory is not None:
            moved, keys = memory.advance(model, state.memory, state.params, images, gather=gather)
            batch = {**batch, "memory_queue": moved["queue"], "memory_valid": memory.valid(moved)}

        applied = model
        if layout is not None:
            applied, params = layout.for_apply(model, state.params)
        else:
            params = state.params

        def objective(params):
            outputs, updates = applied.apply(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            loss, metrics = loss_fn(outputs, batch, params)
            wd_loss = optim.weight_decay_loss(
                params, weight_decay=config.weight_decay, optimizer=config.optimizer
            )
            metrics = {**metrics, "weight_decay_loss": wd_loss, "loss": loss + wd_loss}
            return loss + wd_loss, (updates["batch_stats"], metrics)

        grads, (batch_stats, metrics) = jax.grad(objective, has_aux=True)(params)
        if layout is not None:
            grads = layout.scatter(grads)
        metrics["grad_norm"] = optim.global_norm(grads)
        metrics["learning_rate"] = schedule(state.step)
        updated = state.apply_gradients(grads, tx, batch_stats)
        if memory is not None:
            updated = updated.replace(memory=memory.push(moved, keys))
            metrics["memory_filled"] = updated.memory["queue_filled"].astype(jnp.float32)
        return guarded_update(state, updated, metrics, config.get("skip_nonfinite_steps", 0))

    return train_step


GUARD_METRICS = ("nonfinite", "nonfinite_parts", "halted", "skipped_steps")
GUARDED_PARTS = ("loss", "gradients", "weights", "BN statistics")


def nonfinite_parts(bits: float) -> list[str]:
    """The names encoded in the ``nonfinite_parts`` metric."""
    return [name for i, name in enumerate(GUARDED_PARTS) if int(bits) >> i & 1]


def guarded_update(
    state: TrainState, updated: TrainState, metrics: dict, max_skipped: int
) -> tuple[TrainState, dict]:
    """``updated`` if the step is finite, else ``state`` skipped (within budget) or halted.

    Adds the per-step flags ``nonfinite``, ``nonfinite_parts`` and ``halted`` and the running
    ``skipped_steps`` to ``metrics`` (the loop takes them out before averaging).
    """
    checks = [
        optim.all_finite(x)
        for x in (metrics["loss"], metrics["grad_norm"], updated.params, updated.batch_stats)
    ]
    finite = jnp.all(jnp.stack(checks))
    count = state.skipped_steps + jnp.logical_not(finite).astype(jnp.int32)
    halted = count > max_skipped  # also true for every step after the first halt: count only grows
    apply = jnp.logical_and(finite, jnp.logical_not(halted))
    new = jax.tree_util.tree_map(lambda n, o: jnp.where(apply, n, o), updated, state)
    new = new.replace(
        step=state.step + jnp.logical_not(halted).astype(state.step.dtype),
        skipped_steps=jnp.minimum(count, max_skipped + 1),
    )
    metrics = {
        **metrics,
        "nonfinite": jnp.logical_not(finite).astype(jnp.float32),
        # Which parts failed, one bit each in the order of GUARDED_PARTS.
        "nonfinite_parts": sum(jnp.logical_not(c).astype(jnp.float32) * 2.0**i for i, c in enumerate(checks)),
        "halted": halted.astype(jnp.float32),
        "skipped_steps": new.skipped_steps.astype(jnp.float32),
    }
    return new, metrics


def make_eval_step(
    model,
    extra_sums: Callable[..., dict] | None = None,
    preprocess: Callable[[jax.Array], jax.Array] | None = None,
    layout: Any = None,
) -> Callable[..., dict]:
    """``eval_step(state, batch, *extra) -> sums``: top-1/top-5/loss sums of the supervised head.

    ``extra_sums(batch, *extra)`` adds stage-specific sums (distillation: the teacher's top-1);
    ``preprocess(images)`` makes the evaluation view on the device when the host did not.
    """

    def eval_step(state: TrainState, batch: dict, *extra: Any) -> dict:
        if preprocess is not None:
            batch = {**batch, "image": preprocess(batch["image"])}
        params = layout.gather(state.params) if layout is not None else state.params
        out = model.apply({"params": params, "batch_stats": state.batch_stats}, batch["image"], train=False)
        sums = losses.classification_eval_sums(out["logits_sup"], batch["label"], batch["mask"])
        if extra_sums is not None:
            sums.update(extra_sums(batch, *extra))
        return sums

    return eval_step
