"""Writes a run's checkpoint as a TF2 SavedModel called like the authors' released ones.

    python -m simclrv2_jax.export --workdir=RUN --out=DIR [--step=N] [--image_size=S]
    model = tf.saved_model.load(DIR); model(images, trainable=False)["logits_sup"]   # in TensorFlow

See ``simclrv2_jax.checkpoints.savedmodel`` for what is written and how.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

from simclrv2_jax.checkpoints.savedmodel import DEFAULT_PLATFORMS, export_saved_model
from simclrv2_jax.cli import parse_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (config.json and checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Local folder to write the SavedModel to (new or empty).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export; default: the latest.")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size",
    None,
    "Height and width the model takes; default: the run's (then it is differentiable). 0: any size "
    "(then without gradients).",
)
_PLATFORMS = flags.DEFINE_list(
    "platforms", list(DEFAULT_PLATFORMS), "Platforms the exported program is lowered for."
)
flags.mark_flags_as_required(["workdir", "out"])


def main(argv: list[str]) -> int:
    from absl import app, logging

    from simclrv2_jax.cli import run_reporting_user_errors, start_up

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    start_up()
    code, info = run_reporting_user_errors(
        lambda: export_saved_model(
            _WORKDIR.value,
            _OUT.value,
            _STEP.value,
            image_size=_IMAGE_SIZE.value,
            platforms=tuple(p.strip() for p in _PLATFORMS.value if p.strip()),
        )
    )
    if code == 0:
        logging.info("Exported %s", {k: v for k, v in info.items() if k != "config"})
        shape = "[" + ", ".join(str(d or n) for d, n in zip(info["input_shape"], "NHWC")) + "]"
        print(
            f"Exported step {info['step']} of {_WORKDIR.value} ({info['stage']}, head mode "
            f"{info['head_mode']}) to {_OUT.value}: model = tf.saved_model.load({_OUT.value!r}); "
            f"model(images {shape}, trainable=False) -> {', '.join(info['outputs'])}."
        )
    return code


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
