"""Stage 1: contrastive pretraining with linear evaluation while pretraining.

The step sees the global batch of two views per image, ``[B, 2, H, W, C]``, and runs the model once
on the ``2B`` views (view A rows first, as NT-Xent expects). Batch norm statistics are those of the
whole global batch (``global_bn``) since the step is one jit over global arrays; with per-device BN
(``global_bn=False``) the rows are laid out device by device, each device's images with both their
views, so that a BN group is what one replica of the release normalises together. With
``lineareval_while_pretraining`` the supervised head learns on
``stop_gradient(hiddens[ft_proj_selector])`` of both views with the labels repeated, as in the TF2
release; its loss is added but cannot reach the encoder.

With ``microbatches = K > 1`` the step runs the model on one micro-batch of each device's share at a
time and takes NT-Xent and its gradient once, over the whole global batch (``train/microbatches.py``:
two passes, the second recomputing each micro-batch's forward): the loss sees the projections laid
out as ``devices x K`` groups, as that many devices would hold them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from jax.sharding import Mesh

from simclrv2_jax.data.sources import DataSource
from simclrv2_jax.train import components, inputs, losses, parallel
from simclrv2_jax.train.knn import KnnMonitor
from simclrv2_jax.train.memory import MomentumMemory
from simclrv2_jax.train.parallel import DATA_AXIS
from simclrv2_jax.train.task import Task


def build(config: ml_collections.ConfigDict, mesh: Mesh, source: DataSource | None = None) -> Task:
    source = source or inputs.load_source(config)
    data = inputs.StageInput(config, source, mesh)
    classes = components.num_classes(config, source)
    split = inputs.unlabeled_split(config, source)  # an image folder's unlabeled splits join in
    num_examples = source.num_examples(split)
    model = components.build_model(config, head_mode="pretrain", num_classes=classes, mesh=mesh)
    lineareval = config.lineareval_while_pretraining
    folder = inputs.is_folder(source)
    if lineareval and inputs.is_folder(source):
        if not source.num_classes:
            raise ValueError(
                f"The image folder {source.root} has no labeled split ({config.train_split!r} or "
                f"{config.eval_split!r} with class folders), which the linear head trained while "
                "pretraining needs: set --config.lineareval_while_pretraining=False, or add labeled splits."
            )
        inputs.require_labels(source, config.eval_split, "The linear evaluation while pretraining")

    # Per-device BN: each device's rows hold both views of its images (one BN group), as in the
    # release; the loss gets the views back one after the other. With micro-batches
    # (train/microbatches.py) the rows are laid out so whatever the BN: the step runs the model on
    # one micro-batch at a time and puts the outputs back device by device, micro-batch by
    # micro-batch, so that the loss sees them as devices x microbatches groups.
    microbatches = int(config.get("microbatches", 1))
    groups = int(mesh.devices.size) if not config.global_bn or microbatches > 1 else 0
    loss_groups = groups * microbatches

    def model_inputs(batch: dict) -> tuple[jax.Array, dict]:
        views = batch["image"]
        images = parallel.group_major([views[:, 0], views[:, 1]], groups)
        labels = parallel.group_major([batch["label"], batch["label"]], groups)
        return images, {**batch, "label": labels}

    def projections(outputs: dict) -> jax.Array:
        """[2N, d]: view A of the global batch's examples in order, then view B (NT-Xent's rows)."""
        return parallel.part_major(outputs["proj_head_output"], 2, loss_groups)

    memory = None
    if config.get("memory_size", 0):
        memory = MomentumMemory(
            size=config.memory_size,
            momentum=config.moco_momentum,
            key_dim=config.proj_out_dim,
            hidden_norm=config.hidden_norm,
            keys_of=projections,
        )

    def loss_fn(outputs: dict, batch: dict, params) -> tuple[jax.Array, dict]:
        contrast_loss, aux = losses.nt_xent_loss(
            projections(outputs),
            temperature=config.temperature,
            hidden_norm=config.hidden_norm,
            mesh_axis=DATA_AXIS,
            memory=batch.get("memory_queue"),
            memory_valid=batch.get("memory_valid"),
        )
        metrics = {"contrast_loss": contrast_loss, **aux}
        loss = contrast_loss
        if lineareval:
            # Images without labels (an image folder's unlabeled splits: label -1) take no part.
            labeled = (batch["label"] >= 0).astype(jnp.float32) if folder else None
            sup_loss = losses.supervised_cross_entropy(outputs["logits_sup"], batch["label"], labeled)
            metrics["sup_loss"] = sup_loss
            metrics["sup_acc"] = losses.accuracy(outputs["logits_sup"], batch["label"], labeled)
            loss = loss + sup_loss
        return loss, metrics

    knn = None
    if config.get("knn_monitor", False):
        if inputs.has_labels(source, config.train_split) and inputs.has_labels(source, config.eval_split):
            knn = functools.partial(KnnMonitor, config, model, source, mesh)
        else:
            logging.info(
                "No k-NN monitor: it needs labels in %r and %r, and the image folder has them in "
                "neither or only one.",
                config.train_split,
                config.eval_split,
            )

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
        memory=memory,
        loss_outputs=("proj_head_output", "logits_sup") if lineareval else ("proj_head_output",),
        mesh=mesh,
        train_data=data.train_data(num_views=2, contrastive=True, split=split),
        data_info=getattr(source, "info", None),
        eval_data=data.eval_data() if lineareval else None,
        eval_preprocess=data.eval_preprocess(),
        knn=knn,
        info={
            "num_train_examples": num_examples,
            "num_classes": classes,
            "dataset": config.dataset,
            "class_names": list(source.class_names or ()),
        },
    )
