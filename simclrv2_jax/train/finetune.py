"""Stage 2: fine-tuning on the labeled subset, from a middle layer of the projection head.

The model is built in ``finetune`` mode, so only the projection-head layers up to
``ft_proj_selector`` exist; ``initialize`` copies the backbone and those layers (weights and BN
statistics) from the pretraining checkpoint by name and leaves the new supervised head as
initialised (``zero_init_logits_layer`` zeroes it; ``init_head_from_checkpoint`` takes the
pretrained linear-eval head instead, which fits when ``ft_proj_selector = 0``).

What trains: the supervised head, the backbone after ``fine_tune_after_block`` (the frozen blocks get
a stop-gradient and zeroed updates; as in the TF1 release their BN keeps running in training mode and
updating its statistics, except at ``fine_tune_after_block=4``, linear evaluation, where the backbone
runs in inference mode) and, with ``train_proj_head_in_finetune``,
the kept projection-head layers. Without it (the TF1 release, whose fine-tuning trains only the
backbone blocks and the supervised head) their weights stay as pretrained while their BN still runs
in training mode and updates its moving statistics; the gradient still flows through them.

With ``checkpoint = ''`` the same stage trains from random initialisation: the supervised-only
baseline on the same labels.
"""

from __future__ import annotations

import jax
import ml_collections
from absl import logging
from jax.sharding import Mesh

from simclrv2_jax import checkpoints
from simclrv2_jax.config import flag
from simclrv2_jax.data.sources import DataSource
from simclrv2_jax.train import components, inputs, losses, optim
from simclrv2_jax.train.task import Task


def supervised_loss(outputs: dict, batch: dict, params) -> tuple[jax.Array, dict]:
    """Cross-entropy of the supervised head on the labeled batch."""
    logits = outputs["logits_sup"]
    sup_loss = losses.supervised_cross_entropy(logits, batch["label"], batch["mask"])
    return sup_loss, {"sup_loss": sup_loss, "sup_acc": losses.accuracy(logits, batch["label"], batch["mask"])}


def build(config: ml_collections.ConfigDict, mesh: Mesh, source: DataSource | None = None) -> Task:
    if config.checkpoint:
        # A wrong path fails now, not after compiling.
        checkpoints.SavedRun(config.checkpoint, flag("checkpoint")).latest_step()
        components.adopt_architecture(config, config.checkpoint, what="pretraining checkpoint")
    source = source or inputs.load_source(config)
    data = inputs.StageInput(config, source, mesh)
    classes = components.num_classes(config, source)
    train_source, split, indices, num_labeled = inputs.labeled_data(config, source)
    inputs.require_labels(source, config.eval_split, "Evaluating the fine-tuned model")
    model = components.build_model(config, head_mode="finetune", num_classes=classes, mesh=mesh)
    trainable = None
    train_proj_head = config.get("train_proj_head_in_finetune", True)
    if config.fine_tune_after_block >= 0 or not train_proj_head:
        trainable = optim.trainable_mask(config.fine_tune_after_block, train_proj_head=train_proj_head)
    initialize = None
    if config.checkpoint:
        initialize = checkpoints.initialize_from(
            config.checkpoint,
            mesh,
            what="pretraining checkpoint",
            keep_head=config.init_head_from_checkpoint,
        )
    else:
        logging.warning(
            "finetune: config.checkpoint is empty, so the model starts from random weights "
            "(a supervised-only baseline)."
        )
    return Task(
        name="finetune" if config.checkpoint else "supervised",
        config=config,
        model=model,
        mesh=mesh,
        image_shape=components.image_shape(config, source),
        num_examples=num_labeled,
        loss_fn=supervised_loss,
        trainable=trainable,
        augment=data.train_augment(num_views=1, contrastive=False),
        augment_on_device=data.on_device,
        train_data=data.train_data(
            num_views=1, contrastive=False, source=train_source, split=split, indices=indices
        ),
        eval_data=data.eval_data(),
        eval_preprocess=data.eval_preprocess(),
        initialize=initialize,
        data_info=getattr(source, "info", None),
        inputs={"checkpoint": (config.checkpoint, "checkpoint")} if config.checkpoint else {},
        info={
            "num_labeled_examples": num_labeled,
            "num_classes": classes,
            "dataset": config.dataset,
            "init_checkpoint": config.checkpoint,
            "class_names": list(source.class_names or ()),
        },
    )
