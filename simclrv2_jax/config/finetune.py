"""Fine-tuning configs: ``--config=configs/finetune.py:imagenet,1pct --config.checkpoint=PRETRAIN_WORKDIR``.

Presets: ``imagenet``, ``cifar10``, ``fashion_mnist`` (default), ``fashion_mnist_gpu``, then optionally a
label split (``1pct``, ``10pct``, ``100pct``), ``baseline`` and a model preset
(``imagenet,10pct,r50_2x_sk1``).

The paper's semi-supervised setting: start from ``ft_proj_selector = 1`` (after the first projection
layer), zero-initialise the new supervised head, train the backbone and that head (the kept
projection layer keeps its weights, as in the TF1 release: ``train_proj_head_in_finetune``) with
LARS at lr 0.005*sqrt(B), batch 1024, no weight decay, no warmup, crop + flip only, for 60 epochs
on 1% of ImageNet's labels or 30 epochs on 10%.

``linear_eval``: the release's linear evaluation (its README command): a zero-initialised linear
head on the frozen backbone's output (BN in inference mode), all labels, momentum 0.9 at lr
0.1*B/256, batch 4096, no weight decay, no warmup, 90 epochs, per-device BN.
``checkpoint`` names the pretraining run (its workdir or a step folder); leave it empty to train the
same model from scratch (a supervised-only baseline).
"""

from __future__ import annotations

import ml_collections

from simclrv2_jax.config import fields


def _semi_supervised(c: ml_collections.ConfigDict) -> None:
    c.ft_proj_selector = 1
    c.zero_init_logits_layer = True  # every fine-tuning command of the release sets it
    c.optimizer = "lars"
    c.learning_rate = 0.005
    c.learning_rate_scaling = "sqrt"
    c.weight_decay = 0.0
    c.warmup_epochs = 0.0


def imagenet(c: ml_collections.ConfigDict) -> None:
    fields.apply_dataset(c, "imagenet")
    fields.apply_model_preset(c, "r50_1x_sk0")
    _semi_supervised(c)
    c.train_batch_size = 1024
    c.label_fraction = 0.01
    c.train_epochs = 60


def cifar10(c: ml_collections.ConfigDict) -> None:
    fields.apply_dataset(c, "cifar10")
    fields.apply_model_preset(c, "r18_1x")
    _semi_supervised(c)
    c.train_batch_size = 512
    c.label_fraction = 0.1
    c.train_epochs = 30


def fashion_mnist(c: ml_collections.ConfigDict) -> None:
    fields.apply_dataset(c, "fashion_mnist")
    fields.apply_model_preset(c, "r18_0.25x")
    _semi_supervised(c)
    # Chosen by measurement (benchmarks/finetune_head.py): on this data set training the kept
    # projection layer fine-tunes better than keeping it fixed.
    c.train_proj_head_in_finetune = True
    c.learning_rate = 0.05
    # Batch 64 rather than 128 for the same 30 epochs (twice the steps, the same images): on 600
    # labels both fine-tuning and the baseline gain about 2 points (benchmarks/README.md).
    c.train_batch_size = 64
    c.label_fraction = 0.01
    c.train_epochs = 30


def fashion_mnist_gpu(c: ml_collections.ConfigDict) -> None:
    """Fine-tuning after ``pretrain.py:fashion_mnist_gpu``: R18-0.5x on 1% of the labels (600 images),
    1,500 steps at batch 128 (320 epochs of the labeled subset)."""
    fashion_mnist(c)
    fields.apply_model_preset(c, "r18_0.5x")
    c.train_batch_size = 128
    c.train_epochs = 320
    c.log_every_steps = 100
    c.checkpoint_steps = 2000


def pct1(c: ml_collections.ConfigDict) -> None:
    c.label_fraction = 0.01
    c.train_epochs = 60


def pct10(c: ml_collections.ConfigDict) -> None:
    c.label_fraction = 0.1
    c.train_epochs = 30


def pct100(c: ml_collections.ConfigDict) -> None:
    c.label_fraction = 1.0
    c.train_epochs = 30


def linear_eval(c: ml_collections.ConfigDict) -> None:
    """The release's linear-evaluation command (``--fine_tune_after_block=4`` with momentum)."""
    c.ft_proj_selector = 0
    c.fine_tune_after_block = 4
    c.zero_init_logits_layer = True
    c.optimizer = "momentum"
    c.momentum = 0.9
    c.learning_rate = 0.1
    c.learning_rate_scaling = "linear"
    c.weight_decay = 0.0
    c.warmup_epochs = 0.0
    c.train_epochs = 90
    c.train_batch_size = 4096
    c.global_bn = False
    c.label_fraction = 1.0
    c.examples_per_class = 0


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


def image_folder(c: ml_collections.ConfigDict) -> None:
    """Your own labeled classes (``--config.data_dir=ROOT``): the paper's fine-tuning recipe on every
    label of the training folder (``label_fraction``, ``examples_per_class`` or ``label_list`` pick
    fewer), batch 256, 30 epochs."""
    imagenet(c)
    fields.apply_dataset(c, "image_folder")
    c.train_batch_size = 256
    c.label_fraction = 1.0
    c.train_epochs = 30


DATASET_PRESETS = {
    "imagenet": imagenet,
    "image_folder": image_folder,
    "cifar10": cifar10,
    "fashion_mnist": fashion_mnist,
    "fashion_mnist_gpu": fashion_mnist_gpu,
}
LABEL_PRESETS = {
    "1pct": pct1,
    "10pct": pct10,
    "100pct": pct100,
    "linear_eval": linear_eval,
    "baseline": baseline,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = fields.base_config("finetune")
    fields.add_finetune_fields(c)
    # The kept projection-head layers (up to ft_proj_selector) are trained too (True, the TF2 release)
    # or keep their pretrained weights while their BN statistics still update (False, the TF1 release
    # that produced the paper's numbers and published checkpoints).
    c.train_proj_head_in_finetune = False
    fields.parse_preset_arg(arg, DATASET_PRESETS, "fashion_mnist", c, extra=LABEL_PRESETS)
    return c
