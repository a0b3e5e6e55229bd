"""Pretraining config: ``--config=configs/pretrain.py:imagenet,r50_2x_sk1`` (or ``cifar10``, ``fashion_mnist``).

The presets and their documentation live in ``simclrv2_jax/configs/pretrain.py``.
"""

from simclrv2_jax.configs.pretrain import get_config  # noqa: F401
