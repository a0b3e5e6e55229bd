"""Stage 1: contrastive pretraining with linear evaluation while pretraining.

The step sees the global batch of two views per image, ``[B, 2, H, W, C]``, and runs the model once
on the ``2B`` views (view A rows first, as NT-Xent expects). Batch norm statistics are those of the
whole global batch (``global_bn``) since the step is one jit over global arrays. With
``lineareval_while_pretraining`` the supervised head learns on ``stop_gradient(h)`` of both views
with the labels repeated, as in the release; its loss is added but cannot reach the encoder.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from simclrv2_jax import losses, optim
from simclrv2_jax.parallel import DATA_AXIS
from simclrv2_jax.train import common
from simclrv2_jax.train.state import Task, TrainState, classification_eval_sums


def build(config: ml_collections.ConfigDict, mesh: Mesh) -> Task:
    source = common.load_source(config)
    classes = common.num_classes(config, source)
    num_examples = source.num_examples(config.train_split)
    model = common.build_model(config, head_mode="pretrain", num_classes=classes, mesh=mesh)
    steps = common.total_steps(config, num_examples)
    tx, schedule = common.optimizer(config, num_examples, steps)
    lineareval = config.lineareval_while_pretraining

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        views = batch["image"]
        images = jnp.concatenate([views[:, 0], views[:, 1]], axis=0)
        labels = jnp.concatenate([batch["label"], batch["label"]], axis=0)

        def loss_fn(params):
            out, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, images,
                                       train=True, mutable=["batch_stats"])
            contrast_loss, aux = losses.nt_xent_loss(
                out["proj_head_output"], temperature=config.temperature, hidden_norm=config.hidden_norm,
                mesh_axis=DATA_AXIS)
            metrics = {"contrast_loss": contrast_loss, **aux}
            loss = contrast_loss
            if lineareval:
                sup_loss = losses.supervised_cross_entropy(out["logits_sup"], labels)
                metrics["sup_loss"] = sup_loss
                metrics["sup_acc"] = losses.accuracy(out["logits_sup"], labels)
                loss = loss + sup_loss
            wd_loss = optim.weight_decay_loss(params, weight_decay=config.weight_decay,
                                              optimizer=config.optimizer)
            metrics["weight_decay_loss"] = wd_loss
            loss = loss + wd_loss
            metrics["loss"] = loss
            return loss, (updates["batch_stats"], metrics)

        grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
        metrics["grad_norm"] = optim.global_norm(grads)
        metrics["learning_rate"] = schedule(state.step)
        return state.apply_gradients(grads, tx, batch_stats), metrics

    def eval_step(state: TrainState, batch: dict) -> dict:
        out = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"],
                          train=False)
        return classification_eval_sums(out["logits_sup"], batch["label"], batch["mask"])

    return Task(
        name="pretrain",
        config=config,
        total_steps=steps,
        init_variables=common.init_fn(model, config.image_size, source.image_shape[-1]),
        tx=tx,
        train_step=train_step,
        train_data=common.train_data_fn(config, source, mesh, num_views=2, contrastive=True),
        eval_step=eval_step if lineareval else None,
        eval_data=common.eval_data_fn(config, source, mesh) if lineareval else None,
        info={"num_train_examples": num_examples, "num_classes": classes, "dataset": config.dataset},
    )
