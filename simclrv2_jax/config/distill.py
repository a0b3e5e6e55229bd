"""Distillation configs: ``--config=configs/distill.py:imagenet,r50_1x_sk0 --config.teacher_checkpoint=DIR``.

Presets: ``imagenet``, ``cifar10``, ``fashion_mnist`` (default), then optionally a model preset for
the student (``imagenet,r50_1x_sk0`` distils a bigger teacher into an R50).

The paper distils for 400 epochs on all ImageNet training images with crop + flip, temperature 1
(their best setting) and the teacher's labels only (``alpha = 0``). The student's architecture is the
config's model fields (a preset token picks it); the teacher's comes from the config saved beside
``teacher_checkpoint``. ``init_student_from_teacher`` starts a same-size student from the teacher
(self-distillation). The optimiser settings follow pretraining's LARS recipe, which the paper reuses.
"""

from __future__ import annotations

import ml_collections

from simclrv2_jax.config import fields


def imagenet(c: ml_collections.ConfigDict) -> None:
    fields.apply_dataset(c, "imagenet")
    fields.apply_model_preset(c, "r50_1x_sk0")
    c.train_batch_size = 4096
    c.train_epochs = 400
    c.learning_rate = 0.1
    c.learning_rate_scaling = "sqrt"
    c.warmup_epochs = 5.0
    c.weight_decay = 1e-4
    c.label_fraction = 0.01
    c.checkpoint_steps = 5000


def cifar10(c: ml_collections.ConfigDict) -> None:
    fields.apply_dataset(c, "cifar10")
    fields.apply_model_preset(c, "r18_1x")
    c.train_batch_size = 512
    c.train_epochs = 100
    c.learning_rate = 1.0
    c.learning_rate_scaling = "linear"
    c.warmup_epochs = 5.0
    c.weight_decay = 1e-4
    c.label_fraction = 0.1


def fashion_mnist(c: ml_collections.ConfigDict) -> None:
    fields.apply_dataset(c, "fashion_mnist")
    # The paper's second use of distillation: a smaller student (the teacher's ResNet-18 at half its
    # width, about a quarter of its multiply-adds) trained from random weights on the teacher's labels
    # of the 60,000 unlabeled images, one pass. The pipeline trains the same small network on the
    # labels alone (student_baseline) to say what distillation bought.
    fields.apply_model_preset(c, "r18_0.125x")
    c.train_batch_size = 256
    c.train_epochs = 1.0
    c.init_student_from_teacher = False
    c.ft_proj_selector = 1
    c.learning_rate = 1.0
    c.learning_rate_scaling = "linear"
    c.warmup_epochs = 0.1
    c.weight_decay = 1e-4
    c.label_fraction = 0.01


def image_folder(c: ml_collections.ConfigDict) -> None:
    """Your own images (``--config.data_dir=ROOT``): the training and unlabeled folders, batch 512,
    100 epochs."""
    imagenet(c)
    fields.apply_dataset(c, "image_folder")
    c.train_batch_size = 512
    c.train_epochs = 100
    c.label_fraction = 1.0


DATASET_PRESETS = {
    "imagenet": imagenet,
    "image_folder": image_folder,
    "cifar10": cifar10,
    "fashion_mnist": fashion_mnist,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = fields.base_config("distill")
    fields.add_finetune_fields(c)
    c.teacher_checkpoint = ""
    c.temperature = 1.0
    c.alpha = 0.0
    c.init_student_from_teacher = False
    fields.parse_preset_arg(arg, DATASET_PRESETS, "fashion_mnist", c)
    return c
