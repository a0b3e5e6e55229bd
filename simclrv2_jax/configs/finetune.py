"""Fine-tuning configs: ``get_config("imagenet,1pct")``, ``"imagenet,10pct,r50_2x_sk1"``, ``"cifar10"``,
``"fashion_mnist"``.

The paper's semi-supervised setting: start from ``ft_proj_selector = 1`` (after the first projection
layer), train the whole network with LARS at lr 0.005*sqrt(B), batch 1024, no weight decay, no
warmup, crop + flip only, for 60 epochs on 1% of ImageNet's labels or 30 epochs on 10%.
``checkpoint`` names the pretraining run (its workdir or a step folder); leave it empty to train the
same model from scratch (a supervised-only baseline).
"""

from __future__ import annotations

import ml_collections

from simclrv2_jax.configs.base import apply_dataset, apply_model_preset, base_config, parse_preset_arg


def _semi_supervised(c: ml_collections.ConfigDict) -> None:
    c.ft_proj_selector = 1
    c.optimizer = "lars"
    c.learning_rate = 0.005
    c.learning_rate_scaling = "sqrt"
    c.weight_decay = 0.0
    c.warmup_epochs = 0.0


def imagenet(c: ml_collections.ConfigDict) -> None:
    apply_dataset(c, "imagenet")
    apply_model_preset(c, "r50_1x_sk0")
    _semi_supervised(c)
    c.train_batch_size = 1024
    c.label_fraction = 0.01
    c.train_epochs = 60
    c.eval_batch_size = 1024
    c.checkpoint_steps = 1000


def cifar10(c: ml_collections.ConfigDict) -> None:
    apply_dataset(c, "cifar10")
    apply_model_preset(c, "r18_cifar")
    _semi_supervised(c)
    c.train_batch_size = 512
    c.label_fraction = 0.1
    c.train_epochs = 30
    c.eval_batch_size = 1000


def fashion_mnist(c: ml_collections.ConfigDict) -> None:
    apply_dataset(c, "fashion_mnist")
    apply_model_preset(c, "r18_0.25x")
    _semi_supervised(c)
    c.learning_rate = 0.05
    c.train_batch_size = 128
    c.label_fraction = 0.01
    c.train_epochs = 30
    c.eval_batch_size = 1000
    c.checkpoint_steps = 200
    c.log_every_steps = 25


def pct1(c: ml_collections.ConfigDict) -> None:
    c.label_fraction = 0.01
    c.train_epochs = 60


def pct10(c: ml_collections.ConfigDict) -> None:
    c.label_fraction = 0.1
    c.train_epochs = 30


def pct100(c: ml_collections.ConfigDict) -> None:
    c.label_fraction = 1.0
    c.train_epochs = 30


def baseline(c: ml_collections.ConfigDict) -> None:
    """The supervised-only baseline: same model and labels, trained from random weights.

    A network trained from scratch needs a larger learning rate and weight decay than fine-tuning
    does, so the baseline gets its own (otherwise it would be a straw man).
    """
    c.checkpoint = ""
    c.ft_proj_selector = 0
    c.learning_rate = 0.1
    c.weight_decay = 1e-4
    c.warmup_epochs = 5.0


DATASET_PRESETS = {"imagenet": imagenet, "cifar10": cifar10, "fashion_mnist": fashion_mnist}
LABEL_PRESETS = {"1pct": pct1, "10pct": pct10, "100pct": pct100, "baseline": baseline}


def finetune_fields(c: ml_collections.ConfigDict) -> None:
    """Fields of the labeled subset and of the fine-tuned network (shared with distillation)."""
    c.label_fraction = 1.0
    c.examples_per_class = 0  # > 0 overrides label_fraction
    c.label_seed = 0
    c.fine_tune_after_block = -1
    c.zero_init_logits_layer = False
    c.init_head_from_checkpoint = False


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base_config()
    c.stage = "finetune"
    finetune_fields(c)
    parse_preset_arg(arg, DATASET_PRESETS, "fashion_mnist", c, extra=LABEL_PRESETS)
    return c
