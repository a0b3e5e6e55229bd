"""Runs one stage: ``python -m simclrv2_jax.main --config=configs/pretrain.py:fashion_mnist --workdir=DIR``.

Any config field can be overridden, e.g. ``--config.train_steps=50 --config.train_batch_size=64``;
unknown fields are refused. Running the same command again resumes from the workdir's latest
checkpoint. The stage is the config's ``stage`` field (pretrain, finetune or distill).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file[:presets].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from simclrv2_jax.cli import config_value, run_reporting_user_errors, start_up
    from simclrv2_jax.train import train_stage

    config = config_value(_CONFIG)
    start_up()
    code, results = run_reporting_user_errors(train_stage, config, _WORKDIR.value)
    if code == 0:
        logging.info("Done: %s", {k: v for k, v in results.items() if k != "state"})
    return code


if __name__ == "__main__":
    from simclrv2_jax.cli import parse_flags

    app.run(main, flags_parser=parse_flags)
