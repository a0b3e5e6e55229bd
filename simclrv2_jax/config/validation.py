"""The checks a config passes before anything compiles: one message naming the field and the fix."""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from simclrv2_jax.config import fields
from simclrv2_jax.models.heads import kept_head_layers
from simclrv2_jax.models.resnet import BLOCK_SPECS, block_layout


def _fail(field: str, value: Any, why: str) -> None:
    raise ValueError(f"config.{field}={value!r} is invalid: {why}")


def largest_divisor_at_most(n: int, k: int) -> int:
    """The largest divisor of ``n`` that is at most ``k``."""
    return max(d for d in range(1, max(min(n, k), 1) + 1) if n % d == 0)


def resume_change_names(config: ml_collections.ConfigDict) -> list[str]:
    """The field names listed in ``config.resume_changes``."""
    return [n.strip() for n in str(config.get("resume_changes", "")).split(",") if n.strip()]


def validate(config: ml_collections.ConfigDict) -> None:
    """Rejects impossible values with one message naming the field; runs before any compilation."""
    c = config

    def one_of(field: str, allowed) -> None:
        if c[field] not in allowed:
            _fail(field, c[field], f"use one of {tuple(allowed)}.")

    def positive(field: str, allow_zero: bool = False) -> None:
        value = c[field]
        if value < 0 or (value == 0 and not allow_zero):
            _fail(field, value, "must be " + ("non-negative." if allow_zero else "positive."))

    # NaN passes every comparison below unnoticed (nan < 0 is False) and inf trains to NaN.
    for field, value in c.items():
        if isinstance(value, float) and not math.isfinite(value):
            _fail(field, value, "must be a finite number.")
    one_of("stage", fields.STAGES)
    one_of("optimizer", fields.OPTIMIZERS)
    one_of("learning_rate_scaling", fields.LR_SCALINGS)
    one_of("proj_head_mode", fields.PROJ_HEAD_MODES)
    if c.get("block_counts"):
        try:
            block_layout(c.resnet_depth, c.block_counts)
        except ValueError as e:
            _fail("block_counts", c.block_counts, str(e))
    else:
        one_of("resnet_depth", sorted(BLOCK_SPECS))
    one_of("compute_dtype", fields.DTYPES)
    if "param_sharding" in c:
        one_of("param_sharding", fields.PARAM_SHARDINGS)
        positive("fsdp_min_size")
    if "input_shards" in c:
        positive("input_shards", allow_zero=True)
    if "microbatches" in c:
        positive("microbatches")
        if c.train_batch_size > 0 and c.train_batch_size % c.microbatches:
            fewer = largest_divisor_at_most(c.train_batch_size, c.microbatches)
            _fail(
                "microbatches",
                c.microbatches,
                f"train_batch_size={c.train_batch_size} does not split into {c.microbatches} equal "
                "micro-batches (train_batch_size must divide by devices x microbatches); use a divisor "
                f"of the examples per device, e.g. microbatches={fewer}, "
                "or a train_batch_size that is a multiple of devices x microbatches.",
            )
    for field in (
        "train_batch_size",
        "eval_batch_size",
        "image_size",
        "width_multiplier",
        "log_every_steps",
        "checkpoint_steps",
        "keep_checkpoint_max",
        "num_proj_layers",
        "proj_out_dim",
    ):
        positive(field)
    for field in (
        "train_epochs",
        "train_steps",
        "learning_rate",
        "warmup_epochs",
        "weight_decay",
        "sk_ratio",
        "se_ratio",
        "eval_every_steps",
        "num_classes",
        "skip_nonfinite_steps",
    ):
        positive(field, allow_zero=True)
    for name in resume_change_names(c):
        if name not in fields.RESUME_OPTIMISATION_FIELDS:
            _fail(
                "resume_changes",
                c.resume_changes,
                f"{name!r} is not a field a resumed run may change; those are "
                f"{', '.join(f for f in fields.RESUME_OPTIMISATION_FIELDS if f in c)}.",
            )
    if c.train_steps == 0 and c.train_epochs == 0:
        _fail("train_epochs", c.train_epochs, "set train_epochs > 0 or train_steps > 0.")
    if not 0 <= c.momentum < 1:
        _fail("momentum", c.momentum, "must be in [0, 1).")
    if not 0 < c.batch_norm_decay < 1:
        _fail("batch_norm_decay", c.batch_norm_decay, "must be in (0, 1).")
    if "crop_min_area" in c and not 0.0 < c.crop_min_area <= 1.0:
        _fail(
            "crop_min_area",
            c.crop_min_area,
            "must be in (0, 1]: the smallest fraction of the image a crop covers.",
        )
    if "knn_k" in c:
        positive("knn_k")
        positive("knn_temperature")
        positive("knn_bank_size", allow_zero=True)
    if "temperature" in c and c.temperature <= 0:
        _fail("temperature", c.temperature, "must be positive.")
    if "color_jitter_strength" in c and c.color_jitter_strength < 0:
        _fail("color_jitter_strength", c.color_jitter_strength, "must be non-negative.")
    if "label_fraction" in c and not 0 < c.label_fraction <= 1:
        _fail("label_fraction", c.label_fraction, "must be in (0, 1] (1.0 = every label).")
    if "examples_per_class" in c and c.examples_per_class < 0:
        _fail("examples_per_class", c.examples_per_class, "must be non-negative (0 = use label_fraction).")
    if "fine_tune_after_block" in c and not -1 <= c.fine_tune_after_block <= 4:
        _fail(
            "fine_tune_after_block",
            c.fine_tune_after_block,
            "use -1 (train everything), 0 (freeze the stem) or 1..4 (freeze up to that block group).",
        )
    if "alpha" in c and c.alpha < 0:
        _fail("alpha", c.alpha, "must be non-negative.")
    if "memory_size" in c:
        positive("memory_size", allow_zero=True)
        if not 0 <= c.moco_momentum <= 1:
            _fail("moco_momentum", c.moco_momentum, "must be in [0, 1] (the paper: 0.999).")
        if c.memory_size and c.memory_size < 2 * c.train_batch_size:
            _fail(
                "memory_size",
                c.memory_size,
                f"each step adds the 2 x train_batch_size = {2 * c.train_batch_size} projections of its "
                "views; use at least that many slots (the paper: 65536), or 0 for no memory.",
            )
        if c.memory_size and c.proj_head_mode == "none":
            _fail("memory_size", c.memory_size, "the memory holds projections; it needs a projection head.")
    if c.proj_head_mode == "nonlinear" and c.num_proj_layers < 1:
        _fail("num_proj_layers", c.num_proj_layers, "a nonlinear head needs at least one layer.")
    kept_head_layers(c.proj_head_mode, c.num_proj_layers, c.ft_proj_selector)  # raises with the field name
