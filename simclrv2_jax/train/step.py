"""The train step and the classification eval step, written once for every stage.

A stage supplies only what differs: ``loss_fn(outputs, batch, params) -> (loss, metrics)`` on the
model's named outputs and, where the model input is not simply ``batch["image"]``, a
``model_inputs(batch, *extra) -> (images, batch)`` that runs outside the gradient (pretraining
stacks its two views; distillation adds the frozen teacher's logits to the batch). The factory adds
what every stage shares: the augmentation on the device when the stage asks for it
(``augment(batch, key)`` with the step's key ``fold_in(rng, step)``), the model applied in training
mode with mutable batch statistics, the optimiser's weight-decay term in the loss, the gradient,
``grad_norm`` and ``learning_rate`` in the metrics, and the update behind the finite-state guard.
With ``config.microbatches > 1`` the model runs on one micro-batch of each device's share at a time
(``train/microbatches.py``); everything around the gradient -- the augmentation, the parameters
gathered and the gradient scattered (fsdp), weight decay, the memory's queue, the guard -- happens
once per step, as without.

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
from jax.sharding import Mesh

from simclrv2_jax.train import losses, microbatches, optim
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
    loss_outputs: tuple[str, ...] = (),
    mesh: Mesh | None = None,
) -> Callable[..., tuple[TrainState, dict]]:
    """``train_step(state, batch, *extra) -> (state, metrics)`` minimising ``loss_fn`` + weight decay.

    ``metrics["loss"]`` is the whole objective (``loss_fn``'s loss plus ``weight_decay_loss``).
    ``layout`` (a ``parallel.ParamLayout``) says where the parameters live between steps: with
    sharded parameters the step gathers them for the forward and backward passes and returns each
    device its slice of the gradient, the optimiser then updating the slices.
    ``memory`` (a ``train.memory.MomentumMemory``, pretraining only) moves the memory network, hands
    ``loss_fn`` the queue as ``batch["memory_queue"]`` / ``batch["memory_valid"]``, and enqueues the
    step's memory projections after the loss.
    With ``config.microbatches = K > 1`` each device's share of the batch runs in K micro-batches
    (``train/microbatches.py``) over the devices of ``mesh`` (default: the layout's); ``loss_outputs``
    names the model outputs of a loss over the whole batch (pretraining's NT-Xent), whose gradient is
    then taken exactly in two passes; without it the micro-batches' gradients are averaged.
    """
    gather = layout.gather if layout is not None else None
    k = int(config.get("microbatches", 1))
    mesh = mesh if mesh is not None else (layout.mesh if layout is not None else None)
    micro = microbatches.Microbatches(k, mesh.devices.size if mesh is not None else 1, mesh)
    if k > 1 and memory is not None and not loss_outputs:
        raise ValueError("With micro-batches the memory of negatives needs the loss's outputs named.")

    def weight_decay(params):
        return optim.weight_decay_loss(params, weight_decay=config.weight_decay, optimizer=config.optimizer)

    def whole_batch(state, applied, params, batch, extra):
        """``(grads, batch_stats, metrics, pushed)`` of one pass over the whole batch."""
        images, batch = model_inputs(batch, *extra)
        pushed = None
        if memory is not None:
            moved, keys = memory.advance(model, state.memory, state.params, images, gather=gather)
            batch = {**batch, "memory_queue": moved["queue"], "memory_valid": memory.valid(moved)}
            pushed = (moved, keys)

        def objective(params):
            outputs, updates = applied.apply(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            loss, metrics = loss_fn(outputs, batch, params)
            wd_loss = weight_decay(params)
            metrics = {**metrics, "weight_decay_loss": wd_loss, "loss": loss + wd_loss}
            return loss + wd_loss, (updates["batch_stats"], metrics)

        grads, (batch_stats, metrics) = jax.grad(objective, has_aux=True)(params)
        return grads, batch_stats, metrics, pushed

    def in_microbatches(state, applied, params, batch, extra):
        """The same, one micro-batch at a time (``train/microbatches.py``)."""
        parts = micro.split(batch)
        loss_batch, pushed = {}, None
        if memory is not None:

            def run_memory(variables):
                forward = microbatches.model_forward(model, variables["batch_stats"], loss_outputs)
                outs, _, stats = microbatches.run_forward(
                    forward, variables["params"], parts, model_inputs, extra, micro.unroll
                )
                return micro.join(outs), microbatches.mean_update(variables["batch_stats"], stats)

            moved, keys = memory.advance(
                model, state.memory, state.params, None, gather=gather, forward=run_memory
            )
            loss_batch = {"memory_queue": moved["queue"], "memory_valid": memory.valid(moved)}
            pushed = (moved, keys)
        forward = microbatches.model_forward(applied, state.batch_stats, loss_outputs)
        if loss_outputs:

            def objective(outputs, batch, params):
                loss, metrics = loss_fn(outputs, batch, params)
                wd_loss = weight_decay(params)
                return loss + wd_loss, {**metrics, "weight_decay_loss": wd_loss, "loss": loss + wd_loss}

            grads, batch_stats, metrics = microbatches.exact_gradients(
                forward,
                objective,
                params,
                state.batch_stats,
                batch,
                parts,
                model_inputs,
                extra,
                micro,
                loss_batch,
            )
            return grads, batch_stats, metrics, pushed
        loss, grads, batch_stats, metrics = microbatches.accumulated_gradients(
            forward, loss_fn, params, state.batch_stats, parts, model_inputs, extra, micro
        )
        wd_loss, wd_grads = jax.value_and_grad(weight_decay)(params)
        grads = jax.tree_util.tree_map(jnp.add, grads, wd_grads)
        metrics = {**metrics, "weight_decay_loss": wd_loss, "loss": loss + wd_loss}
        return grads, batch_stats, metrics, pushed

    def train_step(state: TrainState, batch: dict, *extra: Any) -> tuple[TrainState, dict]:
        if augment is not None:
            batch = augment(batch, state.step_key())
        applied = model
        if layout is not None:
            applied, params = layout.for_apply(model, state.params)
        else:
            params = state.params
        gradients = in_microbatches if k > 1 else whole_batch
        grads, batch_stats, metrics, pushed = gradients(state, applied, params, batch, extra)
        if layout is not None:
            grads = layout.scatter(grads)
        metrics["grad_norm"] = optim.global_norm(grads)
        metrics["learning_rate"] = schedule(state.step)
        updated = state.apply_gradients(grads, tx, batch_stats)
        if memory is not None:
            updated = updated.replace(memory=memory.push(*pushed))
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
