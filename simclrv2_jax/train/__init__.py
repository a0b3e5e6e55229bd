"""Training: the shared loop (loop.py), the one train/eval step (step.py) and each stage's set-up."""

from __future__ import annotations

import contextlib
import importlib
from typing import Any

import ml_collections

STAGE_MODULES = {
    "pretrain": "simclrv2_jax.train.pretrain",
    "finetune": "simclrv2_jax.train.finetune",
    "distill": "simclrv2_jax.train.distill",
}


def train_stage(config: ml_collections.ConfigDict, workdir: str, mesh=None, **loop_kwargs: Any) -> dict:
    """Validates ``config`` and trains its stage in ``workdir`` (resuming if it holds a checkpoint).

    The workdir is locked for the run (a second run on it refuses), and SIGTERM / Ctrl-C are caught
    from here on, so that an interrupt while the task is built still ends cleanly.
    """
    import jax

    from simclrv2_jax.checkpoints import workdir as workdir_lib
    from simclrv2_jax.config.validation import validate
    from simclrv2_jax.data import folders
    from simclrv2_jax.train import loop, parallel

    validate(config)
    path = workdir_lib.prepare(workdir)
    lock = workdir_lib.WorkdirLock(path) if jax.process_index() == 0 else contextlib.nullcontext()
    # An image folder's split indexes are kept in the workdir (data/folders.py).
    with lock, loop.StopSignals() as stop, folders.index_home(path):
        mesh = mesh or parallel.create_mesh()
        module = importlib.import_module(STAGE_MODULES[config.stage])
        task = module.build(config, mesh)
        return loop.run(task, workdir, mesh=mesh, stop=stop, **loop_kwargs)
