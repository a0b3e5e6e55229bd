"""Fine-tuning learning rate x ``ft_proj_selector`` on 1% of Fashion-MNIST's labels: 3 x 3 = 9 runs.

From the default job's pretraining (``bash launch/quickstart.sh`` leaves it in
``runs/fashion_mnist_1pct/pretrain``), 9 runs in all::

    python -m simclrv2_jax.sweep --config=configs/finetune.py:fashion_mnist \\
        --sweep=configs/sweeps/finetune_lr_selector.py --workdir=runs/sweeps/finetune_lr_selector \\
        --config.checkpoint=runs/fashion_mnist_1pct/pretrain

Without ``--config.checkpoint`` every run would fine-tune from random weights. Add ``--dry_run`` to
check the nine configs first, ``--launch=print`` for their command lines; run the same command again
to go on after an interrupt. The results land in ``sweep.csv`` and ``sweep.png`` in the workdir.

The preset (``configs/finetune.py:fashion_mnist``) fine-tunes from ``ft_proj_selector=1`` with LARS
at learning rate 0.05 (scaled by sqrt(batch 128): 0.57), so the grid is that rate halved and
doubled, read from the backbone output (0), the first (1) or the second (2) projection layer. The
run ``learning_rate=0.05,ft_proj_selector=1`` is the default job's fine-tuning stage.
"""

from simclrv2_jax import sweeps


def get_sweep():
    return sweeps.product(learning_rate=[0.025, 0.05, 0.1], ft_proj_selector=[0, 1, 2])
