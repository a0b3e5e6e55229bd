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
from simclrv2_jax.fields import ARCH_FIELDS
from simclrv2_jax.models.simclr import SimCLRModel


def load_source(config: ml_collections.ConfigDict) -> sources.DataSource:
    return sources.get_source(config.dataset, config.data_dir or None)


def num_classes(config: ml_collections.ConfigDict, source: sources.DataSource) -> int:
    return config.num_classes or source.num_classes


def build_model(
    config: ml_collections.ConfigDict, *, head_mode: str, num_classes: int, mesh: Mesh, **overrides: Any
) -> SimCLRModel:
    """The model a config describes (its ``ARCH_FIELDS`` and the stage's head settings)."""
    arch = {k: config[k] for k in ARCH_FIELDS}
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


def image_shape(config: ml_collections.ConfigDict, source: sources.DataSource) -> tuple[int, int, int]:
    """(H, W, C) of the images the model sees: the config's size, the source's channels."""
    return (config.image_size, config.image_size, source.image_shape[-1])


def optimizer(
    config: ml_collections.ConfigDict, num_examples: int, total_steps: int, trainable_mask: Any = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The configured optimiser and its warmup+cosine schedule.

    ``trainable_mask`` (a function of the params tree, True = trainable) freezes the rest completely:
    their updates are zeroed *after* the optimiser, so LARS weight decay cannot move them either.
    """
    schedule = optim.learning_rate_schedule(
        base_learning_rate=config.learning_rate,
        batch_size=config.train_batch_size,
        num_examples=num_examples,
        learning_rate_scaling=config.learning_rate_scaling,
        warmup_epochs=config.warmup_epochs,
        total_steps=total_steps,
    )
    tx = optim.make_optimizer(
        optimizer=config.optimizer,
        learning_rate=schedule,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    if trainable_mask is not None:
        tx = optim.freeze(tx, trainable_mask)
    return tx, schedule


def total_steps(config: ml_collections.ConfigDict, num_examples: int) -> int:
    return optim.get_train_steps(
        num_examples, config.train_epochs, config.train_batch_size, config.train_steps
    )


def train_preprocess(config: ml_collections.ConfigDict, *, contrastive: bool):
    """Pretraining: the full SimCLR augmentation; fine-tuning and distillation: crop + flip only."""
    return functools.partial(
        augment.preprocess_for_train,
        height=config.image_size,
        width=config.image_size,
        color_jitter_strength=config.get("color_jitter_strength", 0.0),
        use_blur=contrastive and config.get("use_blur", False),
        color_distort=contrastive,
    )


def train_data_fn(
    config: ml_collections.ConfigDict,
    source: sources.DataSource,
    mesh: Mesh,
    *,
    num_views: int,
    contrastive: bool,
    split: str | None = None,
    indices=None,
):
    local = parallel.local_batch_size(config.train_batch_size, mesh)

    def make(start_step: int):
        return pipeline.train_dataset(
            source,
            split or config.train_split,
            local_batch_size=local,
            seed=config.seed,
            start_step=start_step,
            num_views=num_views,
            image_size=config.image_size,
            preprocess=train_preprocess(config, contrastive=contrastive),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            indices=indices,
        )

    return make


def eval_data_fn(config: ml_collections.ConfigDict, source: sources.DataSource, mesh: Mesh):
    local = parallel.local_batch_size(config.eval_batch_size, mesh, field="eval_batch_size")

    def make():
        return pipeline.eval_dataset(
            source,
            config.eval_split,
            local_batch_size=local,
            image_size=config.image_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

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
        source.labels(config.train_split),
        num_classes=source.num_classes,
        fraction=None if per_class else fraction,
        per_class=per_class or None,
        seed=config.label_seed,
    )
    return source, config.train_split, indices, len(indices)
