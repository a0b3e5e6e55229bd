"""Fields every stage shares, the preset parser and the validation that runs before compiling.

Field names follow the authors' public release wherever one exists (``train_batch_size``,
``learning_rate_scaling``, ``ft_proj_selector``, ...), so a command carries over. Every field is
top-level and overridable: ``--config.train_batch_size=1024``. Unknown fields are rejected by the
locked ConfigDict; impossible values by ``validate`` with a message naming the field and the fix.
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections

from simclrv2_jax.models.heads import PROJ_HEAD_MODES
from simclrv2_jax.models.presets import MODEL_PRESETS
from simclrv2_jax.models.resnet import BLOCK_SPECS

STAGES = ("pretrain", "finetune", "distill")
OPTIMIZERS = ("lars", "momentum", "adam")
LR_SCALINGS = ("linear", "sqrt")
DTYPES = ("float32", "bfloat16")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "pretrain"
    c.seed = 0

    # Data.
    c.dataset = "fashion_mnist"
    c.data_dir = ""  # '' = the data set's default location (tfds default, or the Debian package)
    c.train_split = "train"
    c.eval_split = "test"
    c.image_size = 28
    c.num_classes = 0  # 0 = from the data set

    # Model (presets fill these in).
    c.resnet_depth = 18
    c.width_multiplier = 0.25
    c.sk_ratio = 0.0
    c.se_ratio = 0.0
    c.proj_head_mode = "nonlinear"
    c.num_proj_layers = 3
    c.proj_out_dim = 128
    c.ft_proj_selector = 0
    c.global_bn = True
    c.batch_norm_decay = 0.9
    c.compute_dtype = "float32"  # 'bfloat16' for mixed precision on GPU/TPU

    # Optimisation.
    c.train_batch_size = 256
    c.train_epochs = 100.0
    c.train_steps = 0  # > 0 overrides train_epochs
    c.learning_rate = 0.3
    c.learning_rate_scaling = "linear"
    c.warmup_epochs = 10.0
    c.weight_decay = 1e-6
    c.momentum = 0.9
    c.optimizer = "lars"

    # Augmentation.
    c.color_jitter_strength = 1.0
    c.use_blur = True

    # Evaluation, logging, checkpoints.
    c.eval_batch_size = 256
    c.eval_every_steps = 0  # 0 = evaluate at the end only
    c.log_every_steps = 50
    c.checkpoint_steps = 1000
    c.keep_checkpoint_max = 5
    c.checkpoint = ""  # checkpoint (or earlier stage's workdir) to start from
    c.profile = False  # write a profiler trace of a few steps to the workdir
    return c


DATASETS = {
    "imagenet": dict(dataset="imagenet2012", train_split="train", eval_split="validation", image_size=224),
    "cifar10": dict(dataset="cifar10", train_split="train", eval_split="test", image_size=32),
    "fashion_mnist": dict(dataset="fashion_mnist", train_split="train", eval_split="test", image_size=28),
}


def apply_dataset(config: ml_collections.ConfigDict, name: str) -> None:
    """The data fields of a preset data set (tfds name, splits, image size)."""
    for key, value in DATASETS[name].items():
        config[key] = value


def apply_model_preset(config: ml_collections.ConfigDict, name: str, prefix: str = "") -> None:
    for key, value in MODEL_PRESETS[name].items():
        config[prefix + key] = value


def parse_preset_arg(arg: str | None, dataset_presets: dict[str, Callable[[ml_collections.ConfigDict], None]],
                     default_dataset: str, config: ml_collections.ConfigDict,
                     extra: dict[str, Callable[[ml_collections.ConfigDict], None]] | None = None) -> None:
    """Applies ``"dataset[,model_preset][,extra...]"`` presets, e.g. ``"imagenet,r50_2x_sk1"``."""
    tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
    datasets = [t for t in tokens if t in dataset_presets]
    if len(datasets) > 1:
        raise ValueError(f"Config preset {arg!r} names more than one data set: {datasets}.")
    dataset_presets[datasets[0] if datasets else default_dataset](config)
    for token in tokens:
        if token in dataset_presets:
            continue
        if token in MODEL_PRESETS:
            apply_model_preset(config, token)
        elif extra and token in extra:
            extra[token](config)
        else:
            known = sorted(dataset_presets) + sorted(extra or {}) + ["<model preset>"]
            raise ValueError(f"Unknown config preset {token!r} in {arg!r}. Known: {', '.join(known)}; "
                             f"model presets: {', '.join(sorted(MODEL_PRESETS))}.")


def _fail(field: str, value: Any, why: str) -> None:
    raise ValueError(f"config.{field}={value!r} is invalid: {why}")


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

    one_of("stage", STAGES)
    one_of("optimizer", OPTIMIZERS)
    one_of("learning_rate_scaling", LR_SCALINGS)
    one_of("proj_head_mode", PROJ_HEAD_MODES)
    one_of("resnet_depth", sorted(BLOCK_SPECS))
    one_of("compute_dtype", DTYPES)
    for field in ("train_batch_size", "eval_batch_size", "image_size", "width_multiplier", "log_every_steps",
                  "checkpoint_steps", "keep_checkpoint_max", "num_proj_layers", "proj_out_dim"):
        positive(field)
    for field in ("train_epochs", "train_steps", "learning_rate", "warmup_epochs", "weight_decay",
                  "sk_ratio", "se_ratio", "eval_every_steps", "num_classes"):
        positive(field, allow_zero=True)
    if c.train_steps == 0 and c.train_epochs == 0:
        _fail("train_epochs", c.train_epochs, "set train_epochs > 0 or train_steps > 0.")
    if not 0 <= c.momentum < 1:
        _fail("momentum", c.momentum, "must be in [0, 1).")
    if not 0 < c.batch_norm_decay < 1:
        _fail("batch_norm_decay", c.batch_norm_decay, "must be in (0, 1).")
    if "temperature" in c and c.temperature <= 0:
        _fail("temperature", c.temperature, "must be positive.")
    if "color_jitter_strength" in c and c.color_jitter_strength < 0:
        _fail("color_jitter_strength", c.color_jitter_strength, "must be non-negative.")
    if "label_fraction" in c and not 0 < c.label_fraction <= 1:
        _fail("label_fraction", c.label_fraction, "must be in (0, 1] (1.0 = every label).")
    if "examples_per_class" in c and c.examples_per_class < 0:
        _fail("examples_per_class", c.examples_per_class, "must be non-negative (0 = use label_fraction).")
    if "fine_tune_after_block" in c and not -1 <= c.fine_tune_after_block <= 4:
        _fail("fine_tune_after_block", c.fine_tune_after_block,
              "use -1 (train everything), 0 (freeze the stem) or 1..4 (freeze up to that block group).")
    if "alpha" in c and c.alpha < 0:
        _fail("alpha", c.alpha, "must be non-negative.")
    if c.proj_head_mode == "nonlinear" and c.num_proj_layers < 1:
        _fail("num_proj_layers", c.num_proj_layers, "a nonlinear head needs at least one layer.")
    from simclrv2_jax.models.heads import kept_head_layers
    kept_head_layers(c.proj_head_mode, c.num_proj_layers, c.ft_proj_selector)  # raises with the field name
