"""A trained or converted model at work: predictions, nearest neighbours and k-NN accuracy of a run.

    python -m simclrv2_jax.explore --workdir=RUN                       # the latest checkpoint
    python -m simclrv2_jax.explore --workdir=RUN --num_images=4 --neighbours=8 --bank_size=20000

For the first ``--num_images`` images of the evaluation split it prints the true class, the top-5
classes of the supervised head with their probabilities (where the network has one) and the classes
of the ``--neighbours`` most similar training images in the representation h (``final_avg_pool``),
then the k-NN accuracy of h over the whole split against a bank of ``--bank_size`` training images
(k = ``--knn_k``, majority vote). Classes are printed by name where the data set has names. The data
fields can be set as for ``evaluate`` (``--config.dataset``, ``--config.data_dir``, ...). See
``simclrv2_jax.evaluation.explore`` for the functions, which the Colab notebook uses too.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

from simclrv2_jax.cli import data_flags_parser, define_data_overrides
from simclrv2_jax.evaluation.evaluator import EVAL_FIELDS

_WORKDIR = flags.DEFINE_string("workdir", None, "The run (or a converted checkpoint's workdir).")
_STEP = flags.DEFINE_integer("step", None, "The checkpoint step (default: the latest).")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 8, "Evaluation images to show.")
_NEIGHBOURS = flags.DEFINE_integer("neighbours", 5, "Nearest training images shown per image.")
_KNN_K = flags.DEFINE_integer("knn_k", 20, "Neighbours that vote in the k-NN accuracy.")
_BANK = flags.DEFINE_integer("bank_size", 10000, "Training images in the neighbour bank (0: all).")
_CONFIG = define_data_overrides(EVAL_FIELDS, "Data settings, as for evaluate.")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from simclrv2_jax.cli import run_reporting_user_errors, start_up
    from simclrv2_jax.evaluation.explore import explore_run

    start_up()
    overrides = {k: v for k, v in _CONFIG.value.items() if v is not None}
    code, report = run_reporting_user_errors(
        lambda: explore_run(
            _WORKDIR.value,
            step=_STEP.value,
            overrides=overrides,
            num_images=_NUM_IMAGES.value,
            neighbours=_NEIGHBOURS.value,
            knn_k=_KNN_K.value,
            bank_size=_BANK.value,
        )
    )
    if code == 0:
        print(report)
    return code


if __name__ == "__main__":
    app.run(main, flags_parser=data_flags_parser(EVAL_FIELDS))
