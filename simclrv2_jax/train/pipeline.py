"""The whole method as one pipeline: pretrain -> fine-tune -> distill, plus a supervised-only baseline.

``stage_configs`` wires four stage configs together: the pretraining config decides the data set,
image size and architecture, which fine-tuning and the baseline inherit (they must, to load the
weights); the distillation student keeps its own architecture fields unless it starts from the
teacher; fine-tuning, distillation and the baseline share the labeled subset. ``run_pipeline``
trains them in ``WORKDIR/<stage>``, skipping the stages that already finished with the same config,
and writes ``summary.json`` and ``summary.png`` (see ``evaluation.plots``). The command is
``python -m simclrv2_jax.run_all``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import logging
from ml_collections import ConfigDict

from simclrv2_jax.checkpoints.workdir import finished_results
from simclrv2_jax.config.fields import ARCH_FIELDS, LABEL_FIELDS, SHARED_DATA_FIELDS

PIPELINE_STAGES = ("pretrain", "finetune", "distill", "baseline")


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
    from simclrv2_jax.evaluation.plots import plot_summary
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
