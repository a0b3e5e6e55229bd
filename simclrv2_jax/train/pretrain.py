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

from simclrv2_jax import losses
from simclrv2_jax.data.sources import DataSource
from simclrv2_jax.parallel import DATA_AXIS
from simclrv2_jax.train import components, inputs
from simclrv2_jax.train.task import Task


def build(config: ml_collections.ConfigDict, mesh: Mesh, source: DataSource | None = None) -> Task:
    source = source or inputs.load_source(config)
    data = inputs.StageInput(config, source, mesh)
    classes = components.num_classes(config, source)
    num_examples = source.num_examples(config.train_split)
    model = components.build_model(config, head_mode="pretrain", num_classes=classes, mesh=mesh)
    lineareval = config.lineareval_while_pretraining

    def model_inputs(batch: dict) -> tuple[jax.Array, dict]:
        views = batch["image"]
        images = jnp.concatenate([views[:, 0], views[:, 1]], axis=0)
        labels = jnp.concatenate([batch["label"], batch["label"]], axis=0)
        return images, {**batch, "label": labels}

    def loss_fn(outputs: dict, batch: dict, params) -> tuple[jax.Array, dict]:
        contrast_loss, aux = losses.nt_xent_loss(
            outputs["proj_head_output"],
            temperature=config.temperature,
            hidden_norm=config.hidden_norm,
            mesh_axis=DATA_AXIS,
        )
        metrics = {"contrast_loss": contrast_loss, **aux}
        loss = contrast_loss
        if lineareval:
            sup_loss = losses.supervised_cross_entropy(outputs["logits_sup"], batch["label"])
            metrics["sup_loss"] = sup_loss
            metrics["sup_acc"] = losses.accuracy(outputs["logits_sup"], batch["label"])
            loss = loss + sup_loss
        return loss, metrics

    return Task(
        name="pretrain",
        config=config,
        model=model,
        image_shape=components.image_shape(config, source),
        num_examples=num_examples,
        loss_fn=loss_fn,
        model_inputs=model_inputs,
        augment=data.train_augment(num_views=2, contrastive=True),
        augment_on_device=data.on_device,
        train_data=data.train_data(num_views=2, contrastive=True),
        eval_data=data.eval_data() if lineareval else None,
        eval_preprocess=data.eval_preprocess(),
        info={"num_train_examples": num_examples, "num_classes": classes, "dataset": config.dataset},
    )
