"""The whole method as one pipeline: pretrain -> fine-tune -> distill, plus supervised-only baselines.

``stage_configs`` wires four stage configs together: the pretraining config decides the data set,
image size and architecture, which fine-tuning and the baseline inherit (they must, to load the
weights); the distillation student keeps its own architecture fields unless it starts from the
teacher; fine-tuning, distillation and the baseline share the labeled subset. A student of another
architecture than the teacher's gets its own baseline, ``student_baseline``: the baseline's recipe
on the student's network, which is what distillation into it has to beat. ``run_pipeline``
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

from simclrv2_jax.checkpoints import lineage
from simclrv2_jax.checkpoints.workdir import finished_results
from simclrv2_jax.config import command_flag
from simclrv2_jax.config import flag as config_flag
from simclrv2_jax.config.fields import ARCH_FIELDS, LABEL_FIELDS, SHARED_DATA_FIELDS

PIPELINE_STAGES = ("pretrain", "finetune", "distill", "baseline", "student_baseline")


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
    if any(configs["distill"][f] != configs["finetune"][f] for f in ARCH_FIELDS):
        student = configs["baseline"].copy_and_resolve_references()
        for field in ARCH_FIELDS:
            student[field] = configs["distill"][field]
        configs["student_baseline"] = student
    return configs


# Each stage's inputs (``checkpoints.lineage``): role -> (the stage whose workdir it reads, config field).
STAGE_INPUTS = {
    "finetune": {"checkpoint": ("pretrain", "checkpoint")},
    "distill": {"teacher": ("finetune", "teacher_checkpoint")},
}


def superseded(stage: str, stage_dir: str, workdir: str) -> list[str]:
    """The inputs of the run in ``stage_dir`` that have changed since it started (another run, or
    another step of its earlier stage), described for the log; empty when it is current or new."""
    record = lineage.read(stage_dir)
    if record is None:
        return []
    changed = []
    for role, (source, field) in STAGE_INPUTS.get(stage, {}).items():
        recorded = record.get("inputs", {}).get(role)
        source_dir = os.path.join(workdir, source)
        if recorded is None or not os.path.isdir(os.path.join(source_dir, "checkpoints")):
            continue
        now = lineage.describe(source_dir, config_flag(field))
        if not _same_stage_input(recorded, now, source):
            changed.append(
                f"its {role} was {recorded.get('path')} at step {recorded.get('step')}, now "
                f"{now['path']} at step {now['step']}"
            )
        elif recorded != now:  # the same input, spelled otherwise (a copied or moved pipeline)
            record["inputs"][role] = now
            lineage.write(stage_dir, record)
    return changed


def _same_stage_input(recorded: dict, now: dict, source: str) -> bool:
    """Whether a stage's recorded input is its earlier stage as it is now. Runs are told apart by
    their ids; where one side has none (a stage trained before runs had records), the paths are
    compared relative to the pipeline's folder: the recorded input was this pipeline's ``source``
    stage, wherever the folder was then."""
    if lineage.same(recorded, now):
        return True
    if recorded.get("run_id") and now.get("run_id"):
        return False
    recorded_stage = os.path.basename(os.path.normpath(str(recorded.get("path", ""))))
    return recorded_stage == source and recorded.get("step") == now.get("step")


def set_aside(stage_dir: str) -> str:
    """Moves a stage's workdir out of the way (never deletes it); returns where it went."""
    destination = f"{stage_dir}.superseded-{time.strftime('%Y%m%d-%H%M%S')}"
    os.rename(stage_dir, destination)
    return destination


def run_stage(stage: str, config: ConfigDict, workdir: str) -> tuple[dict[str, Any], bool]:
    """``(results, trained)`` of one pipeline stage in ``workdir/<stage>``: the stored results of a
    finished, current run, else what training (or resuming) it gives. A run whose input changed since
    it started is moved aside first and trained afresh."""
    from simclrv2_jax.train import train_stage

    stage_dir = os.path.join(workdir, stage)
    changed = superseded(stage, stage_dir, workdir)
    if changed:
        moved = set_aside(stage_dir)
        logging.warning(
            "pipeline: %s is out of date (%s); moved its workdir to %s and training it again.",
            stage,
            "; ".join(changed),
            moved,
        )
    # Input paths that name the same runs (a copied or moved pipeline) are no change.
    done = finished_results(
        stage_dir, config, same_inputs=[f for _, f in STAGE_INPUTS.get(stage, {}).values()]
    )
    if done is not None:
        logging.info("pipeline: %s already finished in %s; skipping.", stage, stage_dir)
        return done, False
    logging.info("pipeline: running %s in %s", stage, stage_dir)
    t0 = time.time()
    with command_flag("baseline" if stage == "student_baseline" else stage):  # its --baseline.* flags
        results = train_stage(config, stage_dir)
    results.pop("state", None)
    results["stage_wall_time_s"] = time.time() - t0
    return results, True


def knn_references(config: ConfigDict, workdir: str) -> dict[str, float]:
    """``knn.reference_lines`` of the pretraining config, kept in ``knn_reference.json`` for the same
    data and k-NN settings (a rerun does not measure them again)."""
    from simclrv2_jax.train import knn

    key = {f: config[f] for f in ("dataset", "data_dir", "train_split", "eval_split", "image_size", "seed")}
    key.update({f: config[f] for f in ("knn_k", "knn_temperature", "knn_bank_size", "resnet_depth")})
    key.update(width_multiplier=config.width_multiplier, block_counts=list(config.block_counts))
    path = os.path.join(workdir, "knn_reference.json")
    if os.path.exists(path):
        with open(path) as f:
            kept = json.load(f)
        if kept.get("settings") == key:
            return kept["knn_top1"]
    t0 = time.time()
    lines = knn.reference_lines(config)
    with open(path, "w") as f:
        json.dump({"settings": key, "knn_top1": lines, "wall_time_s": time.time() - t0}, f, indent=2)
    return lines


def run_pipeline(configs: dict[str, ConfigDict], workdir: str, stages: list[str]) -> dict[str, Any]:
    """Runs ``stages`` in order (see the module docstring); returns what summary.json holds.

    ``wall_time_s`` is this invocation's time; ``total_wall_time_s`` sums each stage's stored time
    (the time it took when it was trained, whichever invocation that was)."""
    from simclrv2_jax.evaluation.plots import plot_summary

    t0 = time.time()
    os.makedirs(workdir, exist_ok=True)
    summary: dict[str, Any] = {"workdir": os.path.abspath(workdir), "stages": {}, "trained_now": []}
    for stage in stages:
        if stage not in configs:  # student_baseline of a student with the teacher's architecture
            logging.info("pipeline: %s not needed (the student has the teacher's architecture).", stage)
            continue
        results, trained = run_stage(stage, configs[stage], workdir)
        summary["stages"][stage] = results
        if trained:
            summary["trained_now"].append(stage)
    ft = configs["finetune"]
    summary["labels"] = (
        f"{ft.examples_per_class} labels per class"
        if ft.examples_per_class
        else f"{100 * ft.label_fraction:g}% of labels"
    )
    summary["test_top1"] = {s: r.get("eval", {}).get("top1") for s, r in summary["stages"].items()}
    knn_top1 = summary["stages"].get("pretrain", {}).get("eval", {}).get("knn_top1")
    if knn_top1 is not None:
        summary["knn_top1"] = {"pretrained": knn_top1, **knn_references(configs["pretrain"], workdir)}
    summary["total_wall_time_s"] = sum(
        r.get("stage_wall_time_s", r.get("wall_time_s", 0.0)) for r in summary["stages"].values()
    )
    summary["wall_time_s"] = time.time() - t0
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    plot_summary(
        workdir, [s for s in stages if s in summary["stages"]], summary, os.path.join(workdir, "summary.png")
    )
    return summary
