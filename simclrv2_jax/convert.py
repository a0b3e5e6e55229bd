"""Converts a published SimCLRv2 checkpoint into a workdir of this project.

    python -m simclrv2_jax.convert --source=gs://simclr-checkpoints/simclrv2/pretrained/r50_1x_sk0 \\
        --workdir=runs/r50_1x_sk0 [--ft_proj_selector=0]

The source is a TF1 checkpoint (``model.ckpt-N`` or its folder), a TF2 SavedModel or a TF2 training
checkpoint; see ``simclrv2_jax.checkpoints.release`` for what is read and how.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

from simclrv2_jax.checkpoints.release import convert_to_workdir
from simclrv2_jax.cli import parse_flags

_SOURCE = flags.DEFINE_string(
    "source", None, "TF1 checkpoint (model.ckpt-N or its folder) or TF2 SavedModel."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where to write the converted workdir.")
_SELECTOR = flags.DEFINE_integer(
    "ft_proj_selector", None, "Which hidden the supervised head reads, when the shapes cannot tell."
)
flags.mark_flags_as_required(["source", "workdir"])


def main(argv: list[str]) -> int:
    from absl import app, logging

    from simclrv2_jax.cli import run_reporting_user_errors, start_up

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    start_up()
    code, config = run_reporting_user_errors(
        convert_to_workdir, _SOURCE.value, _WORKDIR.value, _SELECTOR.value
    )
    if code == 0:
        arch = ", ".join(f"{k}={config[k]}" for k in ("resnet_depth", "width_multiplier", "sk_ratio"))
        logging.info("Converted %s into %s (%s)", _SOURCE.value, _WORKDIR.value, arch)
        print(
            f"Converted {_SOURCE.value} -> {_WORKDIR.value} ({arch}, {config['num_classes']} classes, "
            f"ft_proj_selector={config['ft_proj_selector']}). Fine-tune it with --config.checkpoint="
            f"{_WORKDIR.value}"
            + (
                f" or distill from it with --config.teacher_checkpoint={_WORKDIR.value}."
                if config["num_classes"]
                else "."
            )
        )
    return code


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
