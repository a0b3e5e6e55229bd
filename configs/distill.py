"""Distillation configs: ``--config=configs/distill.py:imagenet,r50_1x_sk0 --config.teacher_checkpoint=DIR``.

The stage's fields, defaults and presets live in the package (``simclrv2_jax/config/distill.py``, which
lists the presets), so an installed package works without this file. Your own presets go here: build
on the package's config and change what you need, e.g.

    def get_config(arg=None):
        if arg == "imagenet_short":
            c = distill.get_config("imagenet")
            c.train_epochs = 100
            return c
        return distill.get_config(arg)
"""

from simclrv2_jax.config import distill


def get_config(arg: str | None = None):
    return distill.get_config(arg)
