"""Pretraining configs: ``--config=configs/pretrain.py:imagenet,r50_2x_sk1`` (``cifar10``, ``fashion_mnist``).

The stage's fields, defaults and presets live in the package (``simclrv2_jax/config/pretrain.py``, which
lists the presets), so an installed package works without this file. Your own presets go here: build
on the package's config and change what you need, e.g.

    def get_config(arg=None):
        if arg == "imagenet_short":
            c = pretrain.get_config("imagenet")
            c.train_epochs = 100
            return c
        return pretrain.get_config(arg)
"""

from simclrv2_jax.config import pretrain


def get_config(arg: str | None = None):
    return pretrain.get_config(arg)
