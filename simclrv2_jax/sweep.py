"""``python -m simclrv2_jax.sweep --config=FILE[:presets] --sweep=SWEEP.py --workdir=DIR [--config.F=V ...]``.

See ``simclrv2_jax/sweeps/__init__.py`` for the sweep-file format and what each flag does.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags
from ml_collections import config_flags

from simclrv2_jax.cli import parse_flags
from simclrv2_jax.sweeps.launch import LAUNCHES

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Stage config file[:presets] that every run starts from.", lock_config=True
)
_SWEEP = flags.DEFINE_string(
    "sweep", None, "Sweep file: Python defining get_sweep() -> list of override dicts."
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Sweep directory: one sub-folder per run, sweep.json/csv/png."
)
_LAUNCH = flags.DEFINE_enum(
    "launch",
    "local",
    list(LAUNCHES),
    "local: run here, one after another; tpu: launch/tpu.sh run per run (TPU_NAME, ZONE); "
    "print: print each run's python -m simclrv2_jax.main command line.",
)
_METRIC = flags.DEFINE_string(
    "metric", "eval.top1", "The results.json value (dotted) the table and plot show."
)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Check every run and print the plan; run and write nothing.")
_COLLECT_ONLY = flags.DEFINE_bool("collect_only", False, "Only collect the runs' results into sweep.csv/png.")
flags.mark_flags_as_required(["config", "sweep", "workdir"])


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from simclrv2_jax.cli import config_value, configure_logging, run_reporting_user_errors, start_up
    from simclrv2_jax.sweeps.launch import run_sweep

    config = config_value(_CONFIG)
    trains_here = _LAUNCH.value == "local" and not (_DRY_RUN.value or _COLLECT_ONLY.value)
    if trains_here:
        start_up()
    else:
        configure_logging()
    code, _ = run_reporting_user_errors(
        lambda: run_sweep(
            config,
            _SWEEP.value,
            _WORKDIR.value,
            launch=_LAUNCH.value,
            metric=_METRIC.value,
            dry_run=_DRY_RUN.value,
            collect_only=_COLLECT_ONLY.value,
            config_arg=flags.FLAGS["config"].config_filename,
            base_overrides=config_flags.get_override_values(flags.FLAGS["config"]),
        )
    )
    return code


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
