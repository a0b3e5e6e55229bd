"""Distillation config: ``--config=configs/distill.py:imagenet,r50_1x_sk0 --config.teacher_checkpoint=FINETUNE_WORKDIR``.

The presets and their documentation live in ``simclrv2_jax/configs/distill.py``.
"""

from simclrv2_jax.configs.distill import get_config  # noqa: F401
