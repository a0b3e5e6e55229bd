"""Stage 2: fine-tuning on the labeled subset, from a middle layer of the projection head.

The model is built in ``finetune`` mode, so only the projection-head layers up to
``ft_proj_selector`` exist; ``initialize`` copies the backbone and those layers (weights and BN
statistics) from the pretraining checkpoint by name and leaves the new supervised head as
initialised (``zero_init_logits_layer`` zeroes it; ``init_head_from_checkpoint`` takes the
pretrained linear-eval head instead, which fits when ``ft_proj_selector = 0``). Everything is trained
unless ``fine_tune_after_block`` freezes the backbone up to that block: the model stops gradients and
runs those BNs in inference mode, and the optimiser's updates for those parameters are zeroed.

With ``checkpoint = ''`` the same stage trains from random initialisation: the supervised-only
baseline on the same labels.
"""

from __future__ import annotations

import jax
import ml_collections
from absl import logging
from jax.sharding import Mesh

from simclrv2_jax import checkpoints, parallel
from simclrv2_jax.train import common
from simclrv2_jax.train.state import Task, TrainState


def restore_from(mesh: Mesh, tx, path: str, what: str, *, keep_head: bool):
    """``initialize`` for a stage that starts from another stage's weights (the head only if asked)."""

    def initialize(state: TrainState) -> TrainState:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        target = jax.tree_util.tree_map(lambda x: x, variables)
        if not keep_head:
            target["params"] = {k: v for k, v in target["params"].items() if k != "head_supervised"}
        restored, step = checkpoints.load_variables(path, target, sharding=parallel.replicated(mesh),
                                                    what=what)
        params = dict(state.params)
        params.update(restored["params"])
        logging.info("Initialised from the %s at %s (step %d): %s", what, path, step, sorted(restored["params"]))
        return state.replace(params=params, batch_stats=restored["batch_stats"], opt_state=tx.init(params))
    return initialize


def build(config: ml_collections.ConfigDict, mesh: Mesh) -> Task:
    source = common.load_source(config)
    classes = common.num_classes(config, source)
    train_source, split, indices, num_labeled = common.labeled_data(config, source)
    model = common.build_model(config, head_mode="finetune", num_classes=classes, mesh=mesh)
    steps = common.total_steps(config, num_labeled)
    trainable = common.frozen_mask_fn(config.fine_tune_after_block) if config.fine_tune_after_block >= 0 else None
    tx, schedule = common.optimizer(config, num_labeled, steps, trainable_mask=trainable)
    train_step, eval_step = common.supervised_step_fns(model, tx, schedule, config)
    initialize = None
    if config.checkpoint:
        checkpoints.checkpoint_dir(config.checkpoint)  # a wrong path fails now, not after compiling
        initialize = restore_from(mesh, tx, config.checkpoint, "pretraining checkpoint",
                                  keep_head=config.init_head_from_checkpoint)
    else:
        logging.warning("finetune: config.checkpoint is empty, so the model starts from random weights "
                        "(a supervised-only baseline).")
    return Task(
        name="finetune" if config.checkpoint else "supervised",
        config=config,
        total_steps=steps,
        init_variables=common.init_fn(model, config.image_size, source.image_shape[-1]),
        tx=tx,
        train_step=train_step,
        train_data=common.train_data_fn(config, train_source, mesh, num_views=1, contrastive=False,
                                        split=split, indices=indices),
        eval_step=eval_step,
        eval_data=common.eval_data_fn(config, source, mesh),
        initialize=initialize,
        info={"num_labeled_examples": num_labeled, "num_classes": classes, "dataset": config.dataset,
              "init_checkpoint": config.checkpoint},
    )
