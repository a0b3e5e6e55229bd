"""The whole method in one command: pretrain -> fine-tune -> distill, plus a supervised-only baseline.

    python -m simclrv2_jax.run_all --workdir=runs/fashion_mnist
    python -m simclrv2_jax.run_all --workdir=runs/c10 \\
        --pretrain=configs/pretrain.py:cifar10 --finetune=configs/finetune.py:cifar10,10pct ...

Each stage has its own config flag (``--pretrain``, ``--finetune``, ``--distill``, ``--baseline``) with
the usual overrides (``--pretrain.train_steps=500 --finetune.label_fraction=0.1``). The pretraining
config decides the data set, image size and architecture, which fine-tuning inherits (it must, to load
the weights); the distillation student keeps its own architecture fields (same size by default =
self-distillation). Fine-tuning, distillation and the baseline share the labeled subset.

The workdir holds one sub-folder per stage. Running the command again resumes: finished stages are
skipped (their config unchanged), an interrupted one continues from its last checkpoint. At the end,
``summary.json`` (every stage's metrics, steps, wall time) and ``summary.png`` (training curves and
test accuracy of each stage) are written to the workdir.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from simclrv2_jax.cli import COMMAND_LINE_ERRORS, config_value, exit_bad_command_line
from simclrv2_jax.fields import ARCH_FIELDS, LABEL_FIELDS, SHARED_DATA_FIELDS, config_file
from simclrv2_jax.workdir import finished_results

PIPELINE_STAGES = ("pretrain", "finetune", "distill", "baseline")
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
        name: config_flags.DEFINE_config_file(name, f"{config_file(stage)}:{presets}", doc, lock_config=True)
        for name, (stage, presets, doc) in _CONFIG_FLAGS.items()
    }
except COMMAND_LINE_ERRORS as e:
    # A flag with a default config applies its overrides (--pretrain.*) from sys.argv as it is defined,
    # so an unknown field fails here, at import, not in parse_flags. Run as a command, that is the same
    # one-line error as parse_flags gives; imported as a library, the caller gets the exception.
    if __name__ != "__main__":
        raise
    exit_bad_command_line(e, sys.argv)
_WORKDIR = flags.DEFINE_string("workdir", None, "Pipeline directory (one sub-folder per stage).")
_STAGES = flags.DEFINE_list("stages", list(PIPELINE_STAGES), "Stages to run, in this order.")
flags.mark_flag_as_required("workdir")


def stage_configs(
    pretrain: ConfigDict, finetune: ConfigDict, distill: ConfigDict, baseline: ConfigDict, workdir: str
) -> dict[str, ConfigDict]:
    """Wires the stages together: shared data, inherited architecture, checkpoints, labels."""
    configs = {"pretrain": pretrain, "finetune": finetune, "distill": distill, "baseline": baseline}
    configs = {k: v.copy_and_resolve_references() for k, v in configs.items()}
    for name in ("finetune", "distill", "baseline"):
        for field in SHARED_DATA_FIELDS:
            configs[name][field] = configs["pretrain"][field]
    for field in ARCH_FIELDS:
        configs["finetune"][field] = configs["pretrain"][field]
        configs["baseline"][field] = configs["pretrain"][field]
    if configs["distill"].init_student_from_teacher:
        # A student that starts from the teacher's weights has the teacher's architecture.
        for field in ARCH_FIELDS + ("ft_proj_selector",):
            configs["distill"][field] = configs["finetune"][field]
    for field in LABEL_FIELDS:
        configs["distill"][field] = configs["finetune"][field]
        configs["baseline"][field] = configs["finetune"][field]
    configs["finetune"].checkpoint = os.path.join(workdir, "pretrain")
    configs["distill"].teacher_checkpoint = os.path.join(workdir, "finetune")
    configs["baseline"].checkpoint = ""
    return configs


def run_pipeline(configs: dict[str, ConfigDict], workdir: str, stages: list[str]) -> dict[str, Any]:
    from simclrv2_jax.plots import plot_summary
    from simclrv2_jax.train import train_stage

    os.makedirs(workdir, exist_ok=True)
    summary: dict[str, Any] = {"workdir": os.path.abspath(workdir), "stages": {}}
    for stage in stages:
        config = configs[stage]
        stage_dir = os.path.join(workdir, stage)
        done = finished_results(stage_dir, config)
        if done is not None:
            logging.info("pipeline: %s already finished in %s; skipping.", stage, stage_dir)
            summary["stages"][stage] = done
            continue
        logging.info("pipeline: running %s in %s", stage, stage_dir)
        t0 = time.time()
        results = train_stage(config, stage_dir)
        results.pop("state", None)
        results["stage_wall_time_s"] = time.time() - t0
        summary["stages"][stage] = results
    ft = configs["finetune"]
    summary["labels"] = (
        f"{ft.examples_per_class} labels per class"
        if ft.examples_per_class
        else f"{100 * ft.label_fraction:g}% of labels"
    )
    summary["test_top1"] = {s: r.get("eval", {}).get("top1") for s, r in summary["stages"].items()}
    summary["total_wall_time_s"] = sum(
        r.get("stage_wall_time_s", r.get("wall_time_s", 0.0)) for r in summary["stages"].values()
    )
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    plot_summary(
        workdir, [s for s in stages if s in summary["stages"]], summary, os.path.join(workdir, "summary.png")
    )
    return summary


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from simclrv2_jax.cli import run_reporting_user_errors, start_up

    start_up()
    unknown = [s for s in _STAGES.value if s not in PIPELINE_STAGES]
    if unknown:
        print(
            f"error: --stages has unknown stage(s) {unknown}; use pretrain, finetune, distill, baseline.",
            file=sys.stderr,
        )
        return 2
    configs = stage_configs(*(config_value(_CONFIGS[name], name) for name in PIPELINE_STAGES), _WORKDIR.value)
    code, summary = run_reporting_user_errors(run_pipeline, configs, _WORKDIR.value, _STAGES.value)
    if code:
        return code
    lines = [
        f"  {stage:<9} test top-1 {100 * acc:6.2f}%"
        for stage, acc in summary["test_top1"].items()
        if acc is not None
    ]
    print(
        f"Pipeline finished in {summary['total_wall_time_s'] / 60:.1f} min ({summary['labels']}):\n"
        + "\n".join(lines)
        + f"\nSummary: {os.path.join(_WORKDIR.value, 'summary.json')} and summary.png"
    )
    return 0


if __name__ == "__main__":
    from simclrv2_jax.cli import parse_flags

    app.run(main, flags_parser=parse_flags)
