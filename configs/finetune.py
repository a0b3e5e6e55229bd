"""Fine-tuning configs: ``--config=configs/finetune.py:imagenet,1pct --config.checkpoint=PRETRAIN_WORKDIR``.

The stage's fields, defaults and presets live in the package (``simclrv2_jax/config/finetune.py``, which
lists the presets), so an installed package works without this file. Your own presets go here: build
on the package's config and change what you need, e.g.

    def get_config(arg=None):
        if arg == "imagenet_short":
            c = finetune.get_config("imagenet")
            c.train_epochs = 100
            return c
        return finetune.get_config(arg)
"""

from simclrv2_jax.config import finetune


def get_config(arg: str | None = None):
    return finetune.get_config(arg)
