"""Config -> model, optimiser and data: the parts of a stage's set-up that every stage shares."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from simclrv2_jax import optim, parallel
from simclrv2_jax.data import augment, pipeline, sources, subsets
from simclrv2_jax.models.simclr import SimCLRModel

ARCH_FIELDS = ("resnet_depth", "width_multiplier", "sk_ratio", "se_ratio", "proj_head_mode",
               "num_proj_layers", "proj_out_dim")


def load_source(config: ml_collections.ConfigDict) -> sources.DataSource:
    return sources.get_source(config.dataset, config.data_dir or None)


def num_classes(config: ml_collections.ConfigDict, source: sources.DataSource) -> int:
    return config.num_classes or source.num_classes


def build_model(config: ml_collections.ConfigDict, *, head_mode: str, num_classes: int, mesh: Mesh,
                prefix: str = "", **overrides: Any) -> SimCLRModel:
    """The model a config describes; ``prefix`` reads e.g. ``teacher_resnet_depth`` fields."""
    arch = {k: config[prefix + k] for k in ARCH_FIELDS}
    num_groups = 1 if config.global_bn else int(mesh.devices.size)
    kwargs = dict(
        **arch,
        cifar_stem=config.image_size <= 32,
        ft_proj_selector=config.ft_proj_selector,
        num_classes=num_classes,
        head_mode=head_mode,
        lineareval_while_pretraining=config.get("lineareval_while_pretraining", True),
        zero_init_logits_layer=config.get("zero_init_logits_layer", False),
        fine_tune_after_block=config.get("fine_tune_after_block", -1),
        num_bn_groups=num_groups,
        batch_norm_decay=config.batch_norm_decay,
        dtype=jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32,
    )
    kwargs.update(overrides)
    return SimCLRModel(**kwargs)


def init_fn(model: SimCLRModel, image_size: int, channels: int = 3):
    def init_variables(key: jax.Array) -> dict:
        return model.init(key, jnp.zeros((2, image_size, image_size, channels), jnp.float32), train=False)
    return init_variables


def optimizer(config: ml_collections.ConfigDict, num_examples: int, total_steps: int,
              trainable_mask: Any = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The configured optimiser and its warmup+cosine schedule.

    ``trainable_mask`` (a function of the params tree, True = trainable) freezes the rest completely:
    their updates are zeroed *after* the optimiser, so LARS weight decay cannot move them either.
    """
    schedule = optim.learning_rate_schedule(
        base_learning_rate=config.learning_rate, batch_size=config.train_batch_size,
        num_examples=num_examples, learning_rate_scaling=config.learning_rate_scaling,
        warmup_epochs=config.warmup_epochs, total_steps=total_steps)
    tx = optim.make_optimizer(optimizer=config.optimizer, learning_rate=schedule, momentum=config.momentum,
                              weight_decay=config.weight_decay)
    if trainable_mask is not None:
        def labels(params):
            mask = trainable_mask(params)
            return jax.tree_util.tree_map(lambda t: "train" if t else "frozen", mask)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


def total_steps(config: ml_collections.ConfigDict, num_examples: int) -> int:
    return optim.get_train_steps(num_examples, config.train_epochs, config.train_batch_size, config.train_steps)


def train_preprocess(config: ml_collections.ConfigDict, *, contrastive: bool):
    """Pretraining: the full SimCLR augmentation; fine-tuning and distillation: crop + flip only."""
    return functools.partial(
        augment.preprocess_for_train, height=config.image_size, width=config.image_size,
        color_jitter_strength=config.get("color_jitter_strength", 0.0),
        use_blur=contrastive and config.get("use_blur", False), color_distort=contrastive)


def train_data_fn(config: ml_collections.ConfigDict, source: sources.DataSource, mesh: Mesh, *,
                  num_views: int, contrastive: bool, split: str | None = None, indices=None):
    local = parallel.local_batch_size(config.train_batch_size, mesh)

    def make(start_step: int):
        return pipeline.train_dataset(
            source, split or config.train_split, local_batch_size=local, seed=config.seed,
            start_step=start_step, num_views=num_views, image_size=config.image_size,
            preprocess=train_preprocess(config, contrastive=contrastive),
            process_index=jax.process_index(), process_count=jax.process_count(), indices=indices)
    return make


def eval_data_fn(config: ml_collections.ConfigDict, source: sources.DataSource, mesh: Mesh):
    local = parallel.local_batch_size(config.eval_batch_size, mesh, field="eval_batch_size")

    def make():
        return pipeline.eval_dataset(source, config.eval_split, local_batch_size=local,
                                     image_size=config.image_size, process_index=jax.process_index(),
                                     process_count=jax.process_count())
    return make


def labeled_data(config: ml_collections.ConfigDict, source: sources.DataSource):
    """The labeled training set a config asks for: ``(source, split, indices or None, count)``.

    ImageNet at 1% / 10% uses the official image lists (tfds ``imagenet2012_subset``); any other
    data set takes a class-balanced subset by ``label_seed``: ``examples_per_class`` if set, else
    ``label_fraction`` (1.0 = every label).
    """
    per_class = config.get("examples_per_class", 0)
    fraction = config.get("label_fraction", 1.0)
    official = None if per_class else subsets.labeled_split(config.dataset, fraction)
    if official is not None:
        name, split = official
        subset = sources.get_source(name, config.data_dir or None)
        return subset, split, None, subset.num_examples(split)
    if not per_class and fraction >= 1.0:
        return source, config.train_split, None, source.num_examples(config.train_split)
    indices = subsets.label_fraction_subset(
        source.labels(config.train_split), num_classes=source.num_classes,
        fraction=None if per_class else fraction, per_class=per_class or None, seed=config.label_seed)
    return source, config.train_split, indices, len(indices)


def frozen_mask_fn(fine_tune_after_block: int):
    """Params tree -> bool tree, True where a param is trainable under ``fine_tune_after_block``."""
    frozen_prefixes = []
    if fine_tune_after_block >= 0:
        frozen_prefixes.append("stem")
    frozen_prefixes += [f"block_group{g}_" for g in range(1, fine_tune_after_block + 1)]

    def trainable(params):
        def leaf(path, _):
            names = [getattr(k, "key", None) for k in path]
            if names[0] != "backbone":
                return True
            return not any(str(names[1]).startswith(p) for p in frozen_prefixes)
        return jax.tree_util.tree_map_with_path(leaf, params)
    return trainable


def supervised_step_fns(model: SimCLRModel, tx: optax.GradientTransformation, schedule,
                        config: ml_collections.ConfigDict):
    """Train and eval steps of supervised fine-tuning (also the supervised-only baseline)."""
    from simclrv2_jax import losses
    from simclrv2_jax.train.state import classification_eval_sums

    def train_step(state, batch):
        def loss_fn(params):
            out, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, batch["image"],
                                       train=True, mutable=["batch_stats"])
            sup_loss = losses.supervised_cross_entropy(out["logits_sup"], batch["label"], batch["mask"])
            wd_loss = optim.weight_decay_loss(params, weight_decay=config.weight_decay,
                                              optimizer=config.optimizer)
            metrics = {"sup_loss": sup_loss, "weight_decay_loss": wd_loss, "loss": sup_loss + wd_loss,
                       "sup_acc": losses.accuracy(out["logits_sup"], batch["label"], batch["mask"])}
            return sup_loss + wd_loss, (updates["batch_stats"], metrics)

        grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
        metrics["grad_norm"] = optim.global_norm(grads)
        metrics["learning_rate"] = schedule(state.step)
        return state.apply_gradients(grads, tx, batch_stats), metrics

    def eval_step(state, batch):
        out = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"],
                          train=False)
        return classification_eval_sums(out["logits_sup"], batch["label"], batch["mask"])

    return train_step, eval_step
