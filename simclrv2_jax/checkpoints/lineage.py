"""What a run is and what it started from: ``WORKDIR/run.json``.

Written once, when a run starts fresh (or a release checkpoint is converted)::

    {"run_id": "3f2a...", "created": "2026-12-07 10:00:00 UTC",
     "inputs": {"checkpoint": {"path": "/abs/runs/x/pretrain", "run_id": "9c1e...", "step": 293},
                "teacher": {...}}}

``run_id`` names the run wherever its folder goes: a copied or moved pipeline keeps its ids, so a stage
whose input path is now spelled differently (another folder, relative instead of absolute) still knows
it reads the same run. ``inputs`` are the earlier runs this one was built from (a fine-tuning run's
pretraining checkpoint, a distillation run's teacher), each with the step it read. A result is stale
when its input has moved on since: another run, or another step of the same run.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

import jax
from etils import epath

RUN_RECORD = "run.json"


def read(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The run record of ``workdir``, or None where there is none (runs of earlier versions)."""
    try:
        record = json.loads((_path(workdir) / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def run_id(workdir: str | os.PathLike) -> str | None:
    record = read(workdir)
    return record.get("run_id") if record else None


def describe(path: str, flag: str) -> dict[str, Any]:
    """An input as it is now: the absolute path, the run's id and its latest finished step."""
    from simclrv2_jax.checkpoints.saved_run import SavedRun

    run = SavedRun(path, flag)
    return {"path": os.fspath(run.root), "run_id": run_id(run.root), "step": run.latest_step()}


def same(recorded: dict[str, Any] | None, now: dict[str, Any]) -> bool:
    """Whether two descriptions are one input: the same run (by id where both have one, else by path)
    at the same step."""
    if not recorded:
        return False
    if recorded.get("run_id") and now.get("run_id"):
        same_run = recorded["run_id"] == now["run_id"]
    else:
        same_run = recorded.get("path") == now.get("path")
    return same_run and recorded.get("step") == now.get("step")


def create(workdir: str | os.PathLike, inputs: dict[str, dict[str, Any]], **about: Any) -> dict[str, Any]:
    """Writes a new run record (a fresh id) with ``inputs`` and what else is ``about`` the run (its
    ``class_names``) and returns it (process 0 writes)."""
    record = {
        "run_id": uuid.uuid4().hex,
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "inputs": inputs,
        **{k: v for k, v in about.items() if v},
    }
    write(workdir, record)
    return record


def write(workdir: str | os.PathLike, record: dict[str, Any]) -> None:
    """Rewrites the run record (an input that changed with the user's consent)."""
    if jax.process_index() == 0:
        (_path(workdir) / RUN_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))


def _path(workdir: str | os.PathLike) -> epath.Path:
    workdir = os.fspath(workdir)
    return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))
