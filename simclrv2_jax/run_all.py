"""The whole method in one command: pretrain -> fine-tune -> distill, plus a supervised-only baseline.

    python -m simclrv2_jax.run_all --workdir=runs/fashion_mnist
    python -m simclrv2_jax.run_all --workdir=runs/c10 \\
        --pretrain=configs/pretrain.py:cifar10 --finetune=configs/finetune.py:cifar10,10pct ...

Each stage has its own config flag (``--pretrain``, ``--finetune``, ``--distill``, ``--baseline``) with
the usual overrides (``--pretrain.train_steps=500 --finetune.label_fraction=0.1``). The pretraining
config decides the data set, image size and architecture, which fine-tuning inherits (it must, to load
the weights); the distillation student keeps its own architecture fields (same size by default =
self-distillation). Fine-tuning, distillation and the baseline share the labeled subset. A student
of another architecture gets its own baseline (``student_baseline``: the ``--baseline`` recipe on the
student's network).

The workdir holds one sub-folder per stage. Running the command again resumes: finished stages are
skipped (their config unchanged), an interrupted one continues from its last checkpoint. At the end,
``summary.json`` (every stage's metrics, steps, wall time) and ``summary.png`` (training curves and
test accuracy of each stage) are written to the workdir.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags
from ml_collections import config_flags

from simclrv2_jax.cli import COMMAND_LINE_ERRORS, config_value, exit_bad_command_line, parse_flags
from simclrv2_jax.config import stage_config_file
from simclrv2_jax.train.pipeline import PIPELINE_STAGES, run_pipeline, stage_configs

# Each pipeline stage's config flag: (config file, default presets, help).
_CONFIG_FLAGS = {
    "pretrain": ("pretrain", "fashion_mnist", "Pretraining config."),
    "finetune": ("finetune", "fashion_mnist", "Fine-tuning config."),
    "distill": ("distill", "fashion_mnist", "Distillation config."),
    "baseline": (
        "finetune",
        "fashion_mnist,baseline",
        "Supervised-only baseline: a fine-tuning config trained from random weights.",
    ),
}
try:
    _CONFIGS = {
        name: config_flags.DEFINE_config_file(
            name, f"{stage_config_file(stage)}:{presets}", doc, lock_config=True
        )
        for name, (stage, presets, doc) in _CONFIG_FLAGS.items()
    }
except COMMAND_LINE_ERRORS as e:
    # A flag with a default config applies its overrides (--pretrain.*) from sys.argv as it is defined,
    # so an unknown field fails here, at import, not in parse_flags: the same one-line error.
    exit_bad_command_line(e, sys.argv)
_WORKDIR = flags.DEFINE_string("workdir", None, "Pipeline directory (one sub-folder per stage).")
_STAGES = flags.DEFINE_list("stages", list(PIPELINE_STAGES), "Stages to run, in this order.")
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from simclrv2_jax.cli import run_reporting_user_errors, start_up

    start_up()
    unknown = [s for s in _STAGES.value if s not in PIPELINE_STAGES]
    if unknown:
        print(
            f"error: --stages has unknown stage(s) {unknown}; use {', '.join(PIPELINE_STAGES)}.",
            file=sys.stderr,
        )
        return 2
    configs = stage_configs(*(config_value(_CONFIGS[name], name) for name in _CONFIG_FLAGS), _WORKDIR.value)
    code, summary = run_reporting_user_errors(run_pipeline, configs, _WORKDIR.value, _STAGES.value)
    if code:
        return code
    lines = [
        f"  {stage:<9} test top-1 {100 * acc:6.2f}%"
        for stage, acc in summary["test_top1"].items()
        if acc is not None
    ]
    top1 = summary["test_top1"]
    if top1.get("student_baseline") is not None and top1.get("distill") is not None:
        gain = 100 * (top1["distill"] - top1["student_baseline"])
        lines.append(
            f"  distilled into the smaller student: {gain:+.2f} points over the same network trained "
            "on the labels alone"
        )
    if "knn_top1" in summary:
        knn = summary["knn_top1"]
        lines.append(
            f"  k-NN of h  pretrained {100 * knn['pretrained']:.2f}%, randomly initialised "
            f"{100 * knn['random_init']:.2f}%; k-NN of the raw pixels {100 * knn['pixels']:.2f}%"
        )
    trained = ", ".join(summary["trained_now"]) or "nothing: every stage had finished"
    print(
        f"Pipeline finished in {summary['wall_time_s'] / 60:.1f} min (trained now: {trained}); the stages' "
        f"stored times add up to {summary['total_wall_time_s'] / 60:.1f} min ({summary['labels']}):\n"
        + "\n".join(lines)
        + f"\nSummary: {os.path.join(_WORKDIR.value, 'summary.json')} and summary.png"
    )
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
