"""Fine-tuning config: ``--config=configs/finetune.py:imagenet,1pct --config.checkpoint=PRETRAIN_WORKDIR``.

The presets and their documentation live in ``simclrv2_jax/configs/finetune.py``.
"""

from simclrv2_jax.configs.finetune import get_config  # noqa: F401
