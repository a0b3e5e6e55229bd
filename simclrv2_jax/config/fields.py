"""Config fields: each group of fields, each list of choices and each shared default, defined once.

The stage defaults and presets (``config/pretrain.py``, ``config/finetune.py``, ``config/distill.py``)
build on ``base_config`` and the presets here. This module imports nothing but
``ml_collections`` so that loading a config is instant and never touches an accelerator.

Field names follow the authors' public release wherever one exists (``train_batch_size``,
``learning_rate_scaling``, ``ft_proj_selector``, ...), so a command carries over. Every field is
top-level and overridable: ``--config.train_batch_size=1024``. Unknown fields are rejected by the
locked ConfigDict; impossible values by ``simclrv2_jax.config.validation.validate``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections

# ---- Lists of choices.
STAGES = ("pretrain", "finetune", "distill")
OPTIMIZERS = ("lars", "momentum", "adam")
LR_SCALINGS = ("linear", "sqrt")
DTYPES = ("float32", "bfloat16")
PARAM_SHARDINGS = ("replicated", "fsdp")
PROJ_HEAD_MODES = ("none", "linear", "nonlinear")

# ---- Groups of fields that travel together.
# The network's shape: what a checkpoint must match to be restored into a model.
ARCH_FIELDS = (
    "resnet_depth",
    "block_counts",
    "width_multiplier",
    "sk_ratio",
    "se_ratio",
    "proj_head_mode",
    "num_proj_layers",
    "proj_out_dim",
)
# What the stages of one pipeline share: the data and the seed.
SHARED_DATA_FIELDS = ("dataset", "data_dir", "train_split", "eval_split", "image_size", "num_classes", "seed")
# The labeled subset (fine-tuning, the baseline, distillation's optional labeled loss).
LABEL_FIELDS = ("label_fraction", "examples_per_class", "label_seed", "label_list")

# What a resumed run may change against the config its checkpoint was saved with. Fields that only
# say how the run is watched or saved change freely. Optimisation fields (the schedule, the loss's
# weights, where the data and the teacher are read from) change only when named in
# ``resume_changes``, and the change is recorded in history.jsonl. Every other field fixes the model,
# the data order or the random draws, and a resumed run refuses to change it.
RESUME_FREE_FIELDS = (
    "eval_batch_size",
    "eval_every_steps",
    "log_every_steps",
    "checkpoint_steps",
    "keep_checkpoint_max",
    "checkpoint",  # read only when a run starts fresh
    "profile",
    "skip_nonfinite_steps",
    "skip_bad_images",  # a run stopped by a bad image resumes with it skipped
    "resume_changes",
    "param_sharding",  # where the arrays live, not what they hold
    "fsdp_min_size",
    "remat",
    "scan_blocks",  # the same weights, stacked; a resume converts them
    "knn_monitor",  # what is measured, not what is trained
    "knn_k",
    "knn_temperature",
    "knn_bank_size",
)
RESUME_OPTIMISATION_FIELDS = (
    "train_epochs",
    "train_steps",
    "learning_rate",
    "learning_rate_scaling",
    "warmup_epochs",
    "weight_decay",
    "momentum",
    "batch_norm_decay",
    "compute_dtype",
    "microbatches",  # the same examples, in other BN groups (train/microbatches.py)
    "temperature",
    "alpha",
    "color_jitter_strength",
    "crop_min_area",
    "use_blur",
    "data_dir",
    "teacher_checkpoint",
)

SK_RATIO = 0.0625  # the paper's "SK1"


def _paper_presets() -> dict[str, dict[str, Any]]:
    presets = {}
    for depth in (50, 101, 152, 200):
        for width in (1, 2, 3):
            for sk in (0, 1):
                presets[f"r{depth}_{width}x_sk{sk}"] = dict(
                    resnet_depth=depth, block_counts=(), width_multiplier=float(width), sk_ratio=SK_RATIO * sk
                )
    return presets


# Named architectures: ``r{depth}_{width}x_sk{0,1}`` as in the paper, plus small CPU models. A preset
# fixes only depth, width and SK; the stem follows the image size (the CIFAR stem for 32 px or less).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    **_paper_presets(),
    "r18_1x": dict(resnet_depth=18, block_counts=(), width_multiplier=1.0, sk_ratio=0.0),
    "r18_0.5x": dict(resnet_depth=18, block_counts=(), width_multiplier=0.5, sk_ratio=0.0),
    "r18_0.25x": dict(resnet_depth=18, block_counts=(), width_multiplier=0.25, sk_ratio=0.0),
    "r18_0.125x": dict(resnet_depth=18, block_counts=(), width_multiplier=0.125, sk_ratio=0.0),
    "r34_1x": dict(resnet_depth=34, block_counts=(), width_multiplier=1.0, sk_ratio=0.0),
}

# Each preset data set: its tfds name, splits and image size, and the evaluation batch and logging
# cadence that suit its size (the same in every stage).
DATASETS = {
    "imagenet": dict(
        dataset="imagenet2012",
        train_split="train",
        eval_split="validation",
        image_size=224,
        eval_batch_size=1024,
    ),
    "cifar10": dict(
        dataset="cifar10", train_split="train", eval_split="test", image_size=32, eval_batch_size=1000
    ),
    # Your own images (data/folders.py): set data_dir, and the split and image size that fit them.
    "image_folder": dict(dataset="image_folder", train_split="train", eval_split="test", image_size=224),
    "fashion_mnist": dict(
        dataset="fashion_mnist",
        train_split="train",
        eval_split="test",
        image_size=28,
        eval_batch_size=1000,
        checkpoint_steps=200,
        log_every_steps=25,
    ),
}


def model_preset(name: str) -> dict[str, Any]:
    if name not in MODEL_PRESETS:
        raise ValueError(f"Unknown model preset {name!r}. Known presets: {', '.join(sorted(MODEL_PRESETS))}.")
    return dict(MODEL_PRESETS[name])


def base_config(stage: str) -> ml_collections.ConfigDict:
    """The fields every stage has, with their defaults."""
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.seed = 0

    # Data.
    c.dataset = "fashion_mnist"
    c.data_dir = ""  # '' = the data set's default location (tfds default, or the Debian package)
    c.train_split = "train"
    c.eval_split = "test"
    c.image_size = 28
    c.num_classes = 0  # 0 = from the data set
    # dataset="image_folder" (data/folders.py): the splits that hold images without labels (comma-
    # separated folder names under data_dir; those that exist join pretraining and distillation), and
    # whether images that do not decode are skipped (counted) rather than stopping the run.
    c.unlabeled_splits = "unlabeled"
    c.skip_bad_images = False

    # Model (presets fill these in).
    c.resnet_depth = 18
    # Blocks per group when they are not a standard depth's (e.g. (1, 1, 1, 1)); then resnet_depth is
    # the layer count, 3 * blocks + 2 (bottleneck) or 2 * blocks + 2 (basic). () = resnet_depth's.
    c.block_counts = ()
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

    # Parameter layout over the devices (parallel.py): 'replicated' (every device holds all
    # parameters and optimiser state) or 'fsdp' (each large parameter and its optimiser slots split
    # over the devices, gathered inside the step; for models whose state does not fit one device,
    # e.g. R152-3x-SK1). Parameters with fewer elements than fsdp_min_size stay replicated.
    c.param_sharding = "replicated"
    c.fsdp_min_size = 2**14
    # Recompute each residual block's activations in the backward pass instead of storing them
    # (rematerialisation): only the blocks' inputs stay live, for about a third more compute. Same
    # results; for the largest models and batches per device.
    c.remat = False
    # Each block group's repeated blocks as one scanned loop (models/resnet.py): the same results,
    # weights stacked per group (checkpoints convert between the two layouts on load), and a
    # compile several times faster for the deep models (R101/R152/R200).
    c.scan_blocks = False
    # Each device's share of the global batch in this many micro-batches, one after another inside
    # the one step (train/microbatches.py): the memory of one micro-batch for an extra forward pass
    # in pretraining, whose NT-Xent gradient stays exactly that of the whole global batch; each
    # micro-batch is its own BN group, so with global_bn=False one device with K micro-batches
    # trains as K devices with the same global batch. train_batch_size must divide by devices x K.
    c.microbatches = 1
    # Disjoint shards the training data is read in, each with its own order and augmentation draws;
    # the global batch is their batches one after another. 0: one per process (what a multi-host
    # job needs). The data a run sees depends on this number alone, so a 2-process run's batches are
    # reproduced on 1 process with input_shards=2 (e.g. resuming a pod run on a smaller slice).
    c.input_shards = 0

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
    # The random resized crop's smallest fraction of the image area (the release: 0.08 at any size).
    c.crop_min_area = 0.08
    # Where the augmentations run: True = inside the jitted step (JAX), False = on the host (tf.data),
    # None = automatic (the device on GPU/TPU; on the CPU the host, or the device without TensorFlow).
    c.augment_on_device = ml_collections.FieldReference(None, field_type=bool)

    # Evaluation, logging, checkpoints.
    c.eval_batch_size = 256
    c.eval_every_steps = 0  # 0 = evaluate at the end only
    c.log_every_steps = 50
    c.checkpoint_steps = 1000
    c.keep_checkpoint_max = 5
    c.checkpoint = ""  # checkpoint (or earlier stage's workdir) to start from
    # The k-NN measure of a representation (train/knn.py; pretraining's monitor, evaluate --knn): h of
    # each evaluation image votes among its knn_k most cosine-similar training images, weights
    # exp(similarity / knn_temperature); knn_bank_size > 0 puts that many training images (drawn by
    # seed) in the bank instead of the whole split.
    c.knn_k = 200
    c.knn_temperature = 0.1
    c.knn_bank_size = 0
    c.profile = False  # write a profiler trace of a few steps to the workdir

    # Safety.
    # Non-finite steps (loss, gradients, new weights or BN statistics) are never applied; up to this
    # many are skipped and counted, and the next one stops the run (0: stop at the first).
    c.skip_nonfinite_steps = 0
    # Optimisation fields a resumed run may change, comma-separated (e.g. "learning_rate"); see
    # RESUME_OPTIMISATION_FIELDS. Any other difference from the checkpoint's config is refused.
    c.resume_changes = ""
    return c


def add_finetune_fields(c: ml_collections.ConfigDict) -> None:
    """The labeled subset and the fine-tuned network's fields (fine-tuning and distillation)."""
    c.label_fraction = 1.0
    c.examples_per_class = 0  # > 0 overrides label_fraction
    c.label_seed = 0
    # A file listing the labeled images, one path per line relative to the training split's folder
    # (image folders; as the release's ImageNet 1% / 10% lists). Empty: label_fraction / examples_per_class.
    c.label_list = ""
    c.fine_tune_after_block = -1
    c.zero_init_logits_layer = False
    c.init_head_from_checkpoint = False


def apply_dataset(config: ml_collections.ConfigDict, name: str) -> None:
    config.update(DATASETS[name])


def apply_model_preset(config: ml_collections.ConfigDict, name: str) -> None:
    config.update(model_preset(name))


Preset = Callable[[ml_collections.ConfigDict], None]


def parse_preset_arg(
    arg: str | None,
    dataset_presets: dict[str, Preset],
    default_dataset: str,
    config: ml_collections.ConfigDict,
    extra: dict[str, Preset] | None = None,
) -> None:
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
            raise ValueError(
                f"Unknown config preset {token!r} in {arg!r}. Known: {', '.join(known)}; "
                f"model presets: {', '.join(sorted(MODEL_PRESETS))}."
            )
