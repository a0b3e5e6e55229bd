"""Running a sweep's runs: here, one after another (``local``), on a TPU slice through
``launch/tpu.sh`` (``tpu``), or as command lines to run elsewhere (``print``).

Each run is what ``python -m simclrv2_jax.main --config=... --workdir=SWEEP/<name> --config.F=V ...``
would run; a finished run (``workdir.finished_results``) is skipped, and an interrupted one resumes
from its checkpoint because ``train_stage`` does.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import logging
from etils import epath

from simclrv2_jax.checkpoints import workdir as workdir_lib
from simclrv2_jax.sweeps import SweepError, plan, report

LAUNCHES = ("local", "tpu", "print")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TPU_SCRIPT = os.path.join("launch", "tpu.sh")
# Each run waits for the previous one on the slice: KEEP_ALIVE=1 makes tpu.sh stay until the run
# exits (relaunching it after a preemption), and MODULE pins the entry point whatever the shell says.
TPU_ENV = {"MODULE": "simclrv2_jax.main", "KEEP_ALIVE": "1"}


def _flag_text(value: Any) -> str:
    """A value as ``--config.FIELD=TEXT`` parses it back (config_flags: literals for tuples and None)."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    return str(value)


def override_args(overrides: Mapping[str, Any]) -> list[str]:
    return [f"--config.{field}={_flag_text(value)}" for field, value in overrides.items()]


def run_args(run: plan.Run, config_arg: str, base_overrides: Mapping[str, Any]) -> list[str]:
    """The flags of ``simclrv2_jax.main`` for a run: the config, its workdir, the base overrides with
    the run's on top (each field once)."""
    overrides = {**base_overrides, **run.overrides}
    return [f"--config={config_arg}", f"--workdir={run.workdir}", *override_args(overrides)]


def main_command(run: plan.Run, config_arg: str, base_overrides: Mapping[str, Any]) -> str:
    return shlex.join(["python", "-m", "simclrv2_jax.main", *run_args(run, config_arg, base_overrides)])


def repo_config_arg(config_arg: str) -> str:
    """The ``--config`` argument relative to the repository root, where tpu.sh runs it on the workers."""
    path, sep, presets = config_arg.partition(":")
    absolute = os.path.abspath(path)
    if os.path.commonpath([absolute, REPO_ROOT]) == REPO_ROOT:
        path = os.path.relpath(absolute, REPO_ROOT)
    return f"{path}{sep}{presets}"


def tpu_command(run: plan.Run, config_arg: str, base_overrides: Mapping[str, Any]) -> str:
    args = run_args(run, repo_config_arg(config_arg), base_overrides)
    env = [f"{k}={v}" for k, v in TPU_ENV.items()]
    return shlex.join([*env, "bash", TPU_SCRIPT, "run", *args])


def _in_run(error: BaseException, run: plan.Run) -> BaseException:
    """The same kind of error (so that its exit code stays), its message naming the run."""
    message = (
        f"{run.label} in {run.workdir}: {error} The sweep stopped here; finished runs are kept, and the "
        "same command goes on from this run."
    )
    try:
        return type(error)(message)
    except Exception:
        return SweepError(message)


def run_local(runs: Sequence[plan.Run]) -> None:
    """Trains the runs one after another in this process, skipping finished ones."""
    from simclrv2_jax import train as train_lib
    from simclrv2_jax.train.loop import Interrupted

    for position, run in enumerate(runs, 1):
        if workdir_lib.finished_results(run.workdir, run.config) is not None:
            logging.info("%s finished already in %s; skipping.", run.label, run.workdir)
            continue
        logging.info("%s [%d of %d] in %s", run.label, position, len(runs), run.workdir)
        try:
            results = train_lib.train_stage(run.config, run.workdir)
        except (ValueError, FileNotFoundError, FloatingPointError) as e:
            raise _in_run(e, run) from e
        except Interrupted:
            logging.warning("%s interrupted; the same command resumes it.", run.label)
            raise
        results.pop("state", None)


def run_tpu(runs: Sequence[plan.Run], config_arg: str, base_overrides: Mapping[str, Any]) -> None:
    """``launch/tpu.sh run ...`` for each unfinished run in turn, each waiting for its run to end."""
    for run in runs:
        if report.run_status(run)[0] == "finished":
            logging.info("%s finished already in %s; skipping.", run.label, run.workdir)
            continue
        logging.info(
            "%s on %s: %s",
            run.label,
            os.environ["TPU_NAME"],
            tpu_command(run, config_arg, base_overrides),
        )
        args = run_args(run, repo_config_arg(config_arg), base_overrides)
        code = subprocess.run(
            ["bash", TPU_SCRIPT, "run", *args], cwd=REPO_ROOT, env={**os.environ, **TPU_ENV}, check=False
        ).returncode
        if code:
            raise SweepError(
                f"{run.label}: launch/tpu.sh exited with code {code}; see `bash launch/tpu.sh logs`. The "
                "sweep stopped here; finished runs are kept, and the same command goes on from this run."
            )


def _lead_process() -> bool:
    """Whether this process writes the sweep's files (process 0 of a multi-host job)."""
    if "jax" not in sys.modules:
        return True
    import jax

    return jax.process_index() == 0


def run_sweep(
    base,
    sweep_file: str,
    workdir: str,
    *,
    launch: str = "local",
    metric: str = "eval.top1",
    dry_run: bool = False,
    collect_only: bool = False,
    config_arg: str = "",
    base_overrides: Mapping[str, Any] | None = None,
    out: Callable[[str], None] = print,
) -> list[plan.Run]:
    """Plans the sweep (every run checked before any starts), then runs, launches or prints it, and
    collects the results into ``workdir``. ``out`` receives what the command prints."""
    if launch not in LAUNCHES:
        raise SweepError(f"--launch={launch} is not one of {', '.join(LAUNCHES)}.")
    base_overrides = dict(base_overrides or {})
    runs = plan.plan_runs(base, plan.load_sweep(sweep_file), workdir)
    if collect_only:
        if not epath.Path(workdir).exists():
            raise SweepError(f"nothing to collect: the sweep directory {workdir} does not exist.")
        _report(runs, workdir, metric, out)
        return runs
    if dry_run or launch == "print":
        for run in runs:
            if launch == "local":
                status = report.run_status(run)[0]
                out(f"{run.index:>3}  {status:<8}  {run.workdir}")
            else:
                command = tpu_command if launch == "tpu" else main_command
                out(command(run, config_arg, base_overrides))
        if dry_run:
            out(f"{len(runs)} runs checked; nothing was run or written (--dry_run).")
        return runs
    if launch == "tpu":
        missing = [name for name in ("TPU_NAME", "ZONE") if not os.environ.get(name)]
        if missing:
            raise SweepError(
                f"--launch=tpu needs {' and '.join(missing)} set, as launch/tpu.sh does: "
                "export TPU_NAME=my-v4-64 ZONE=us-central2-b (see launch/tpu.sh)."
            )
        if "://" not in workdir:
            logging.warning(
                "sweep: %s is not on GCS; each TPU worker writes its own copy. Use --workdir=gs://...",
                workdir,
            )
    lead = _lead_process()
    if lead:
        workdir_lib.prepare(workdir)
        report.write_record(
            workdir,
            runs,
            config=config_arg,
            sweep=sweep_file,
            base_overrides=base_overrides,
            launch=launch,
        )
    if launch == "tpu":
        run_tpu(runs, config_arg, base_overrides)
    else:
        run_local(runs)
    if lead:
        _report(runs, workdir, metric, out)
    return runs


def _report(runs: Sequence[plan.Run], workdir: str, metric: str, out: Callable[[str], None]) -> None:
    _, text = report.write_report(workdir, runs, metric)
    out(text)
    out(f"Results: {os.path.join(workdir, report.CSV_NAME)} and {report.PLOT_NAME}")
