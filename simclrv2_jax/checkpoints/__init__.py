"""Checkpoints: Orbax saves and resume (``manager``), one reader for a run on disk (``saved_run``), the
workdir lock (``workdir``), and the authors' released checkpoints in (``release``) and out
(``savedmodel``)."""

from simclrv2_jax.checkpoints.manager import SET_ASIDE_SUBDIR, Checkpointer, all_finite, initialize_from
from simclrv2_jax.checkpoints.saved_run import CHECKPOINT_SUBDIR, CheckpointError, DamagedCheckpoint, SavedRun

__all__ = [
    "CHECKPOINT_SUBDIR",
    "SET_ASIDE_SUBDIR",
    "CheckpointError",
    "DamagedCheckpoint",
    "Checkpointer",
    "SavedRun",
    "all_finite",
    "initialize_from",
]
