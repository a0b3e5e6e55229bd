"""Pretraining configs: ``--config=configs/pretrain.py:imagenet,r50_2x_sk1`` (``cifar10``, ``fashion_mnist``).

* ``imagenet``: the paper's settings -- batch 4096, 800 epochs, LARS lr 0.1*sqrt(B) = 6.4, weight
  decay 1e-4, temperature 0.1, 3-layer head, warmup 5% of the epochs, colour strength 1.0 + blur.
* ``cifar10``: the public CIFAR-10 recipe -- ResNet-18 with the CIFAR stem, batch 512, 1000 epochs,
  lr 1.0 with linear scaling, weight decay 1e-4, temperature 0.5, colour strength 0.5, no blur.
* ``fashion_mnist`` (default): a run sized for a 2-core CPU on the offline Fashion-MNIST package.
* ``fashion_mnist_gpu``: the same data set sized for one accelerator (a few minutes on one H100).

A model preset after the data set (``r50_2x_sk1``, ``r152_3x_sk1``, ...) picks the architecture.
"""

from __future__ import annotations

import ml_collections

from simclrv2_jax.config import fields


def imagenet(c: ml_collections.ConfigDict) -> None:
    fields.apply_dataset(c, "imagenet")
    fields.apply_model_preset(c, "r50_1x_sk0")
    c.train_batch_size = 4096
    c.train_epochs = 800
    c.learning_rate = 0.1
    c.learning_rate_scaling = "sqrt"
    c.warmup_epochs = 40.0
    c.weight_decay = 1e-4
    c.temperature = 0.1
    c.color_jitter_strength = 1.0
    c.use_blur = True
    c.checkpoint_steps = 5000
    c.eval_every_steps = 25000
    c.log_every_steps = 100


def cifar10(c: ml_collections.ConfigDict) -> None:
    fields.apply_dataset(c, "cifar10")
    fields.apply_model_preset(c, "r18_1x")
    c.train_batch_size = 512
    c.train_epochs = 1000
    c.learning_rate = 1.0
    c.learning_rate_scaling = "linear"
    c.warmup_epochs = 10.0
    c.weight_decay = 1e-4
    c.temperature = 0.5
    c.color_jitter_strength = 0.5
    c.use_blur = False
    c.checkpoint_steps = 2000
    c.eval_every_steps = 10000


def fashion_mnist(c: ml_collections.ConfigDict) -> None:
    fields.apply_dataset(c, "fashion_mnist")
    fields.apply_model_preset(c, "r18_0.25x")
    c.train_batch_size = 256
    # The default job's budget: ~1.25 epochs (293 steps) keeps the whole CPU pipeline short. Longer
    # runs keep improving (--config.train_epochs=100 is a proper CPU-hours run).
    c.train_epochs = 1.25
    # Chosen by measurement for this short budget (benchmarks/README.md, "The default job"): a
    # larger learning rate, a lower temperature and crops of at least a fifth of the 28 px image.
    c.learning_rate = 2.0
    c.learning_rate_scaling = "linear"
    c.warmup_epochs = 0.1
    c.weight_decay = 1e-4
    c.temperature = 0.2
    c.crop_min_area = 0.2
    c.color_jitter_strength = 0.5
    c.use_blur = False


def fashion_mnist_gpu(c: ml_collections.ConfigDict) -> None:
    """Fashion-MNIST sized for one accelerator (``benchmarks/accelerator.py``'s end-to-end part): with
    the fine-tuning preset of the same name and its baseline, a few minutes on one H100. R18-0.5x,
    batch 512, 150 epochs, LARS at 2.0 for the batch (1.0 per 256), temperature 0.5, the
    augmentations on the device."""
    fashion_mnist(c)
    fields.apply_model_preset(c, "r18_0.5x")
    c.train_batch_size = 512
    c.train_epochs = 150
    c.warmup_epochs = 10.0
    c.learning_rate = 1.0
    c.learning_rate_scaling = "linear"
    c.temperature = 0.5
    c.crop_min_area = 0.08
    c.checkpoint_steps = 2000
    c.log_every_steps = 100


def image_folder(c: ml_collections.ConfigDict) -> None:
    """Your own images (``--config.data_dir=ROOT``, see data/folders.py): the ImageNet recipe (224 px,
    R50-1x, colour 1.0 + blur, LARS at 0.1·sqrt(B), τ 0.1) at a batch and length for one accelerator."""
    imagenet(c)
    fields.apply_dataset(c, "image_folder")
    c.train_batch_size = 512
    c.train_epochs = 100
    c.warmup_epochs = 10.0
    c.checkpoint_steps = 1000
    c.eval_every_steps = 0


DATASET_PRESETS = {
    "imagenet": imagenet,
    "image_folder": image_folder,
    "cifar10": cifar10,
    "fashion_mnist": fashion_mnist,
    "fashion_mnist_gpu": fashion_mnist_gpu,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = fields.base_config("pretrain")
    c.temperature = 0.1
    c.hidden_norm = True
    c.lineareval_while_pretraining = True
    # knn_top1 of h at every evaluation and at the end (train/knn.py), when the data has labels.
    c.knn_monitor = True
    # SimCLRv2's MoCo-style memory of negatives (train/memory.py). A queue of the last memory_size
    # projections of a momentum (EMA, moco_momentum) copy of the encoder and head joins every
    # anchor's negatives. The paper: about +1% top-1 at small batches, little at batch 4096, where the
    # batch already holds 8,190 negatives per anchor; off by default, as in the paper's main runs.
    # The paper's setting: memory_size=65536, moco_momentum=0.999. 0 = no memory.
    c.memory_size = 0
    c.moco_momentum = 0.999
    fields.parse_preset_arg(arg, DATASET_PRESETS, "fashion_mnist", c)
    return c
