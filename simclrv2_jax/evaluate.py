"""Evaluates a run's checkpoints on its evaluation split: ``python -m simclrv2_jax.evaluate --workdir=RUN``.

    python -m simclrv2_jax.evaluate --workdir=RUN                      # the latest checkpoint
    python -m simclrv2_jax.evaluate --workdir=RUN --step=400           # one checkpoint
    python -m simclrv2_jax.evaluate --workdir=RUN --every_checkpoint   # each one, as the run saves it
    python -m simclrv2_jax.evaluate --workdir=RUN --knn                # and the k-NN of h
    python -m simclrv2_jax.evaluate --workdir=RUN --config.eval_split=validation --config.data_dir=DIR

Any workdir with checkpoints: a pretraining run (its linear-evaluation head), a fine-tuning or
distillation run, or a converted release checkpoint. See ``simclrv2_jax.evaluation.evaluator``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

from simclrv2_jax.cli import data_flags_parser, define_data_overrides
from simclrv2_jax.evaluation.evaluator import (
    EVAL_FIELDS,
    RESULTS_NAME,
    describe,
    evaluate_run,
)

_WORKDIR = flags.DEFINE_string("workdir", None, "The run to evaluate (or a converted checkpoint's workdir).")
_STEP = flags.DEFINE_integer("step", None, "Evaluate this checkpoint step (default: the latest).")
_EVERY = flags.DEFINE_bool(
    "every_checkpoint", False, "Evaluate every checkpoint, and each new one as the run saves it."
)
_OUTPUT = flags.DEFINE_string("output_dir", None, f"Where {RESULTS_NAME} goes (default: --workdir).")
_TIMEOUT = flags.DEFINE_float(
    "timeout_s", 600.0, "With --every_checkpoint: stop after this long with nothing new and no run training."
)
_POLL = flags.DEFINE_float(
    "poll_s", 10.0, "With --every_checkpoint: seconds between looks for new checkpoints."
)
_KNN = flags.DEFINE_bool(
    "knn",
    False,
    "Also measure the representation h by k-NN (knn_top1: the training split as the bank, k = "
    "--config.knn_k, weights exp(sim / --config.knn_temperature)); a network without a supervised "
    "head is measured by it alone.",
)
_CONFIG = define_data_overrides(EVAL_FIELDS, f"Data settings: --config.<field> for {', '.join(EVAL_FIELDS)}.")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from simclrv2_jax.cli import run_reporting_user_errors, start_up
    from simclrv2_jax.train.loop import Interrupted

    start_up()
    overrides = {k: v for k, v in _CONFIG.value.items() if v is not None}

    def evaluate():
        try:
            return evaluate_run(
                _WORKDIR.value,
                step=_STEP.value,
                every_checkpoint=_EVERY.value,
                overrides=overrides,
                output_dir=_OUTPUT.value,
                timeout_s=_TIMEOUT.value,
                poll_s=_POLL.value,
                knn=_KNN.value,
            )
        except KeyboardInterrupt:
            raise Interrupted(
                f"Evaluation stopped by Ctrl-C. Finished evaluations are in {RESULTS_NAME}; run the same "
                "command to go on."
            ) from None

    code, added = run_reporting_user_errors(evaluate)
    for entry in added or []:
        print(
            f"step {entry['step']}: {describe(entry)}  ({entry['num_examples']} examples of "
            f"{entry['dataset']}/{entry['eval_split']})"
        )
    return code


if __name__ == "__main__":
    app.run(main, flags_parser=data_flags_parser(EVAL_FIELDS))
