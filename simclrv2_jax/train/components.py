"""Config -> model and optimiser: the parts of a stage's set-up that every stage shares (data: inputs.py)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import Mesh

from simclrv2_jax.config import flag as config_flag
from simclrv2_jax.config.fields import ARCH_FIELDS
from simclrv2_jax.data import sources
from simclrv2_jax.models.simclr import SimCLRModel
from simclrv2_jax.train import optim


def num_classes(config: ml_collections.ConfigDict, source: sources.DataSource) -> int:
    """The supervised head's classes: ``config.num_classes``, or the data set's when it is 0. Fewer
    than the data set has is an error: labels past the head's last class would make the loss NaN."""
    if config.num_classes and config.num_classes < source.num_classes:
        raise ValueError(
            f"config.num_classes={config.num_classes} is fewer than the {source.num_classes} classes of "
            f"data set {config.dataset!r}. Set {config_flag('num_classes')}={source.num_classes} (or 0: "
            "the data set's count)."
        )
    return config.num_classes or source.num_classes


def build_model(
    config: ml_collections.ConfigDict, *, head_mode: str, num_classes: int, mesh: Mesh, **overrides: Any
) -> SimCLRModel:
    """The model a config describes (its ``ARCH_FIELDS`` and the stage's head settings)."""
    arch = {k: config[k] for k in ARCH_FIELDS if k in config}
    arch["block_counts"] = tuple(arch.get("block_counts") or ()) or None
    num_groups = 0 if config.global_bn else int(mesh.devices.size)
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
        remat=bool(config.get("remat", False)),
        scan_blocks=bool(config.get("scan_blocks", False)),
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


def abstract_variables(model: SimCLRModel, image_shape: tuple[int, ...]) -> dict[str, Any]:
    """``{'params', 'batch_stats'}`` of ``model`` as ShapeDtypeStructs (nothing is computed)."""
    images = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def adopt_architecture(
    config: ml_collections.ConfigDict, path: str, *, what: str, flag: str | None = None
) -> None:
    """Gives ``config`` the architecture (``ARCH_FIELDS``) of the checkpoint it starts from.

    A stage that starts from a checkpoint has that checkpoint's network, so its fields are taken
    from the config saved beside it (a run of this project or a converted release checkpoint) and
    the command needs no model flags. The stem is the one thing the image size decides (the CIFAR
    stem at 32 px or less): a mismatch there is an error naming the fix.
    """
    from simclrv2_jax import checkpoints
    from simclrv2_jax.config.validation import validate

    saved = checkpoints.SavedRun(path, flag or config_flag("checkpoint")).saved_config()
    changed = {}
    for field in ARCH_FIELDS:
        if field not in saved or field not in config:
            continue
        value = tuple(saved[field]) if isinstance(config[field], tuple) else saved[field]
        if value != config[field]:
            changed[field] = (config[field], value)
            config[field] = value
    if changed:
        logging.info(
            "%s: architecture taken from the %s at %s: %s",
            config.stage,
            what,
            path,
            ", ".join(f"{k}={v!r} (was {old!r})" for k, (old, v) in changed.items()),
        )
    saved_size = saved.get("image_size")
    if saved_size is not None and (saved_size <= 32) != (config.image_size <= 32):
        stem = "CIFAR (3x3, for images of 32 px or less)" if saved_size <= 32 else "ImageNet"
        raise ValueError(
            f"The {what} at {path} has the {stem} stem (trained at {saved_size} px), but "
            f"config.image_size={config.image_size} selects the other one. Set --config.image_size="
            f"{'32' if saved_size <= 32 else '64 or more'} (the images are resized to it)."
        )
    validate(config)
