"""One run per workdir, and a resumed run that is the same run: the lock and the config comparison.

* ``WorkdirLock``: ``WORKDIR/lock.json`` names the run that holds the workdir (host, pid, the
  process's start time, the command). A second run on the same workdir refuses with one message
  naming the holder. A lock left by a process that died (``kill -9``, a lost VM) is detected and
  taken over: on the same host the pid is gone or belongs to a process started at another time; from
  another host the holder's heartbeat (the file's time, refreshed every minute) is older than
  ``STALE_AFTER_S``.
* ``check_resume``: the config a run resumes with against the config its checkpoint was saved with.
  See ``fields.RESUME_FREE_FIELDS`` and ``fields.RESUME_OPTIMISATION_FIELDS`` for what may change.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import logging
from etils import epath

from simclrv2_jax import config as config_lib
from simclrv2_jax.config import fields

LOCK_NAME = "lock.json"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0


class WorkdirError(ValueError):
    """A workdir that cannot be used: not a directory, not writable, or held by another run."""


def prepare(workdir: str, flag: str = "--workdir") -> epath.Path:
    """Creates ``workdir`` if needed; one clear error naming ``flag`` if it is a file or cannot be
    written."""
    path = epath.Path(workdir if "://" in os.fspath(workdir) else os.path.abspath(workdir))
    if path.exists() and not path.is_dir():
        raise WorkdirError(f"{flag} {workdir} is a file, not a directory. Pass a directory path.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirError(
            f"Cannot create {flag} {workdir}: {_os_reason(e)}. Pass a writable {flag}."
        ) from None
    return path


def _os_reason(e: OSError) -> str:
    reasons = {
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.ENOSPC: "disk full",
    }
    return reasons.get(e.errno, e.strerror or str(e))


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None where /proc is absent."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # Field 22, counted after the command name, which is in parentheses and may hold spaces.
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start_time: str | None) -> bool:
    """Whether process ``pid`` on this host is the one that wrote the lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    if start_time is not None:
        current = _process_start_time(pid)
        if current is not None and current != start_time:
            return False  # the pid was reused by a later process
    return True


class WorkdirLock:
    """Holds ``WORKDIR/lock.json`` for the lifetime of a run (a context manager)."""

    def __init__(self, workdir: epath.Path, description: str = "") -> None:
        self.path = workdir / LOCK_NAME
        self.record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process_start_time": _process_start_time(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": description or " ".join(sys.argv),
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: treated as stale below (its heartbeat is the file's time)

    def _stale(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") == self.record["host"] and isinstance(holder.get("pid"), int):
            return not _alive(holder["pid"], holder.get("process_start_time"))
        try:
            stat = self.path.stat()
            age = time.time() - getattr(stat, "mtime", getattr(stat, "st_mtime", 0.0))
        except OSError:
            return True
        return age > STALE_AFTER_S

    def live_holder(self) -> dict[str, Any] | None:
        """The record of the run holding the workdir now, or None if none does (or it is gone)."""
        holder = self._holder()
        if holder is None or self._stale(holder):
            return None
        return holder

    def _create(self) -> bool:
        """Creates the lock file only if it does not exist (atomically on a local file system)."""
        text = json.dumps(self.record, indent=2)
        if "://" in os.fspath(self.path):
            if self.path.exists():
                return False
            self.path.write_text(text)
            return True
        try:
            fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True

    def acquire(self) -> None:
        try:
            created = self._create()
            if not created:
                holder = self._holder()
                if holder is not None and not self._stale(holder):
                    raise WorkdirError(
                        f"The workdir {self.path.parent} is in use by another run: pid {holder.get('pid')} "
                        f"on host {holder.get('host')}, started {holder.get('started')} "
                        f"({holder.get('command', '')!s:.120}). Wait for it to end, stop it, or use another "
                        f"--workdir. If no such run exists, delete {self.path}."
                    )
                if holder is not None:
                    logging.warning(
                        "Taking over the lock of a run that is gone (pid %s on %s, started %s): %s",
                        holder.get("pid"),
                        holder.get("host"),
                        holder.get("started"),
                        self.path,
                    )
                self.path.unlink(missing_ok=True)
                if not self._create():
                    raise WorkdirError(
                        f"Another run took the workdir {self.path.parent} at the same moment; use another "
                        "--workdir or wait for that run to end."
                    )
        except OSError as e:
            raise WorkdirError(
                f"Cannot write to the workdir {self.path.parent}: {_os_reason(e)}. Pass a writable --workdir."
            ) from None
        self.held = True
        self._thread = threading.Thread(target=self._heartbeat, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.path.write_text(json.dumps(self.record, indent=2))
            except OSError:
                pass  # a transient storage hiccup; the next beat tries again

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.held:
            holder = self._holder()
            if (
                holder
                and holder.get("pid") == self.record["pid"]
                and holder.get("host") == self.record["host"]
            ):
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def running_run(workdir: epath.Path) -> dict[str, Any] | None:
    """The lock record of a live run training in ``workdir``, or None (evaluators read this)."""
    return WorkdirLock(workdir).live_holder()


def finished_results(
    workdir: str | os.PathLike, config: ml_collections.ConfigDict, same_inputs: Sequence[str] = ()
) -> dict[str, Any] | None:
    """The run's ``results.json`` if it already ran to the end in ``workdir`` with this very config
    (``completed``, and ``config.json`` equal to ``config``), else None: such a run is skipped.

    ``same_inputs``: path fields the caller has checked name the same inputs (``lineage``) however
    they are spelled; they are left out of the comparison."""
    path = epath.Path(workdir)
    try:
        results = json.loads((path / "results.json").read_text())
        saved = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    try:  # a run of an earlier version: the fields added since hold their defaults (one rule)
        saved = config_lib.plain(config_lib.from_saved(saved))
    except ValueError:
        return None
    now = config_lib.plain(config)
    for field in same_inputs:
        saved.pop(field, None)
        now.pop(field, None)
    if saved != now or not results.get("completed"):
        return None
    return results


def config_changes(saved: dict[str, Any], config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved value, current value)}`` for every field whose value differs."""
    now = config_lib.plain(config)
    missing = object()
    return {
        k: (saved.get(k, "(absent)"), now.get(k, "(absent)"))
        for k in sorted(set(saved) | set(now))
        if saved.get(k, missing) != now.get(k, missing)
    }


def check_resume(
    saved: dict[str, Any] | None, config: ml_collections.ConfigDict, checkpoint_path: str
) -> dict[str, tuple[Any, Any]]:
    """The optimisation changes the resumed run makes (to be recorded); refuses any other change.

    Raises ``ValueError`` listing the differences: fields that fix the model, the data order or the
    random draws never change on resume; optimisation fields change only when named in
    ``config.resume_changes``.
    """
    if saved is None:
        return {}
    # The checkpoint's config read by the one rule for other versions (config.from_saved): a field
    # added since keeps its default, so checkpoints of earlier versions stay resumable while it does.
    as_saved = saved
    try:
        saved = config_lib.plain(config_lib.from_saved(saved))
    except ValueError:
        pass  # no known stage: every field is compared as saved
    changes = {k: (as_saved.get(k, "(absent)"), now) for k, (_, now) in config_changes(saved, config).items()}
    allowed = {n.strip() for n in str(config.get("resume_changes", "")).split(",") if n.strip()}
    fixed = {
        k: v
        for k, v in changes.items()
        if k not in fields.RESUME_FREE_FIELDS + fields.RESUME_OPTIMISATION_FIELDS
    }
    unasked = {
        k: v for k, v in changes.items() if k in fields.RESUME_OPTIMISATION_FIELDS and k not in allowed
    }

    def listing(items: dict[str, tuple[Any, Any]]) -> str:
        return "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in items.items())

    if fixed:
        raise ValueError(
            f"This run's config differs from the one the checkpoint at {checkpoint_path} was trained with, "
            f"in fields that fix the model, the data order or the random draws: {listing(fixed)}. "
            "Resume with the checkpoint's values (its config.json) or use another --workdir."
        )
    if unasked:
        raise ValueError(
            f"This run's config changes optimisation fields against the checkpoint at {checkpoint_path}: "
            f"{listing(unasked)}. To continue with the new values, name them: "
            f"{config_lib.flag('resume_changes')}={','.join(unasked)} (the change is recorded in "
            "history.jsonl); "
            "or resume with the checkpoint's values."
        )
    return {k: v for k, v in changes.items() if k in fields.RESUME_OPTIMISATION_FIELDS}
