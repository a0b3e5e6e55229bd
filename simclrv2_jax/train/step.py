"""The train step and the classification eval step, written once for every stage.

A stage supplies only what differs: ``loss_fn(outputs, batch, params) -> (loss, metrics)`` on the
model's named outputs and, where the model input is not simply ``batch["image"]``, a
``model_inputs(batch, *extra) -> (images, batch)`` that runs outside the gradient (pretraining
stacks its two views; distillation adds the frozen teacher's logits to the batch). The factory adds
what every stage shares: the augmentation on the device when the stage asks for it
(``augment(batch, key)`` with the step's key ``fold_in(rng, step)``), the model applied in training
mode with mutable batch statistics, the optimiser's weight-decay term in the loss, the gradient,
``grad_norm`` and ``learning_rate`` in the metrics, and the update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax

from simclrv2_jax import losses, optim
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
) -> Callable[..., tuple[TrainState, dict]]:
    """``train_step(state, batch, *extra) -> (state, metrics)`` minimising ``loss_fn`` + weight decay.

    ``metrics["loss"]`` is the whole objective (``loss_fn``'s loss plus ``weight_decay_loss``).
    """

    def train_step(state: TrainState, batch: dict, *extra: Any) -> tuple[TrainState, dict]:
        if augment is not None:
            batch = augment(batch, state.step_key())
        images, batch = model_inputs(batch, *extra)

        def objective(params):
            outputs, updates = model.apply(
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

        grads, (batch_stats, metrics) = jax.grad(objective, has_aux=True)(state.params)
        metrics["grad_norm"] = optim.global_norm(grads)
        metrics["learning_rate"] = schedule(state.step)
        return state.apply_gradients(grads, tx, batch_stats), metrics

    return train_step


def make_eval_step(
    model,
    extra_sums: Callable[..., dict] | None = None,
    preprocess: Callable[[jax.Array], jax.Array] | None = None,
) -> Callable[..., dict]:
    """``eval_step(state, batch, *extra) -> sums``: top-1/top-5/loss sums of the supervised head.

    ``extra_sums(batch, *extra)`` adds stage-specific sums (distillation: the teacher's top-1);
    ``preprocess(images)`` makes the evaluation view on the device when the host did not.
    """

    def eval_step(state: TrainState, batch: dict, *extra: Any) -> dict:
        if preprocess is not None:
            batch = {**batch, "image": preprocess(batch["image"])}
        out = model.apply(
            {"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False
        )
        sums = losses.classification_eval_sums(out["logits_sup"], batch["label"], batch["mask"])
        if extra_sums is not None:
            sums.update(extra_sums(batch, *extra))
        return sums

    return eval_step
