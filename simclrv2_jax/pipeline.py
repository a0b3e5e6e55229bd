"""The whole method in one command: pretrain -> fine-tune -> distill, plus a supervised-only baseline.

    python -m simclrv2_jax.pipeline --workdir=runs/fashion_mnist
    python -m simclrv2_jax.pipeline --workdir=runs/c10 \\
        --pretrain=simclrv2_jax/configs/pretrain.py:cifar10 --finetune=...:cifar10,10pct ...

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

from absl import app, flags, logging  # noqa: E402
from ml_collections import ConfigDict, config_flags  # noqa: E402

_CONFIGS = os.path.join(os.path.dirname(__file__), "configs")
_PRETRAIN = config_flags.DEFINE_config_file(
    "pretrain", os.path.join(_CONFIGS, "pretrain.py") + ":fashion_mnist", "Pretraining config.", lock_config=True)
_FINETUNE = config_flags.DEFINE_config_file(
    "finetune", os.path.join(_CONFIGS, "finetune.py") + ":fashion_mnist", "Fine-tuning config.", lock_config=True)
_DISTILL = config_flags.DEFINE_config_file(
    "distill", os.path.join(_CONFIGS, "distill.py") + ":fashion_mnist", "Distillation config.", lock_config=True)
_BASELINE = config_flags.DEFINE_config_file(
    "baseline", os.path.join(_CONFIGS, "finetune.py") + ":fashion_mnist,baseline",
    "Supervised-only baseline: a fine-tuning config trained from random weights.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Pipeline directory (one sub-folder per stage).")
_STAGES = flags.DEFINE_list("stages", ["pretrain", "finetune", "distill", "baseline"],
                            "Stages to run, in this order.")
flags.mark_flag_as_required("workdir")

SHARED_DATA_FIELDS = ("dataset", "data_dir", "train_split", "eval_split", "image_size", "num_classes", "seed")
ARCH_FIELDS = ("resnet_depth", "width_multiplier", "sk_ratio", "se_ratio", "proj_head_mode", "num_proj_layers",
               "proj_out_dim")
LABEL_FIELDS = ("label_fraction", "examples_per_class", "label_seed")


def stage_configs(pretrain: ConfigDict, finetune: ConfigDict, distill: ConfigDict, baseline: ConfigDict,
                  workdir: str) -> dict[str, ConfigDict]:
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


def _finished(workdir: str, config: ConfigDict) -> dict[str, Any] | None:
    """The stage's results if it already ran to the end with this very config."""
    try:
        with open(os.path.join(workdir, "results.json")) as f:
            results = json.load(f)
        with open(os.path.join(workdir, "config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    if saved != json.loads(json.dumps(config.to_dict())) or not results.get("completed"):
        return None
    return results


def _history(workdir: str) -> list[dict[str, float]]:
    path = os.path.join(workdir, "history.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_summary(workdir: str, stages: list[str], summary: dict[str, Any], path: str) -> None:
    """Training loss of every stage and the test accuracy each one reached, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {"pretrain": "train/contrast_loss", "finetune": "train/sup_loss", "distill": "train/distill_loss",
              "baseline": "train/sup_loss"}
    fig, axes = plt.subplots(1, len(stages) + 1, figsize=(4.2 * (len(stages) + 1), 3.6))
    for ax, stage in zip(axes, stages):
        rows = [r for r in _history(os.path.join(workdir, stage)) if curves[stage] in r]
        ax.plot([r["step"] for r in rows], [r[curves[stage]] for r in rows], color="tab:blue")
        ax.set_title(f"{stage}: {curves[stage].split('/')[1]}")
        ax.set_xlabel("step")
        evals = [r for r in _history(os.path.join(workdir, stage)) if "eval/top1" in r]
        if evals:
            twin = ax.twinx()
            twin.plot([r["step"] for r in evals], [100 * r["eval/top1"] for r in evals], "o-", color="tab:orange")
            twin.set_ylabel("test top-1 (%)", color="tab:orange")
    ax = axes[-1]
    labels = {"pretrain": "linear eval\n(pretrain)", "finetune": "fine-tuned", "distill": "distilled",
              "baseline": "supervised\nonly"}
    names = [s for s in stages if summary["stages"][s].get("eval", {}).get("top1") is not None]
    values = [100 * summary["stages"][s]["eval"]["top1"] for s in names]
    bars = ax.bar([labels[s] for s in names], values, color=["tab:gray", "tab:green", "tab:purple", "tab:red"][:len(names)])
    for bar, value in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.1f}", ha="center", va="bottom")
    ax.set_ylim(min(values + [100]) - 15 if values else 0, 100)
    ax.set_title(f"test top-1 (%), {summary.get('labels', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_pipeline(configs: dict[str, ConfigDict], workdir: str, stages: list[str]) -> dict[str, Any]:
    from simclrv2_jax.train import train_stage

    os.makedirs(workdir, exist_ok=True)
    summary: dict[str, Any] = {"workdir": os.path.abspath(workdir), "stages": {}}
    for stage in stages:
        config = configs[stage]
        stage_dir = os.path.join(workdir, stage)
        done = _finished(stage_dir, config)
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
    summary["labels"] = (f"{ft.examples_per_class} labels per class" if ft.examples_per_class
                         else f"{100 * ft.label_fraction:g}% of labels")
    summary["test_top1"] = {s: r.get("eval", {}).get("top1") for s, r in summary["stages"].items()}
    summary["total_wall_time_s"] = sum(r.get("stage_wall_time_s", r.get("wall_time_s", 0.0))
                                       for r in summary["stages"].values())
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    plot_summary(workdir, [s for s in stages if s in summary["stages"]], summary,
                 os.path.join(workdir, "summary.png"))
    return summary


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from simclrv2_jax.cli import run_reporting_user_errors, start_up

    start_up()
    unknown = [s for s in _STAGES.value if s not in ("pretrain", "finetune", "distill", "baseline")]
    if unknown:
        print(f"error: --stages has unknown stage(s) {unknown}; use pretrain, finetune, distill, baseline.",
              file=sys.stderr)
        return 2
    configs = stage_configs(_PRETRAIN.value, _FINETUNE.value, _DISTILL.value, _BASELINE.value, _WORKDIR.value)
    code, summary = run_reporting_user_errors(run_pipeline, configs, _WORKDIR.value, _STAGES.value)
    if code:
        return code
    lines = [f"  {stage:<9} test top-1 {100 * acc:6.2f}%" for stage, acc in summary["test_top1"].items()
             if acc is not None]
    print(f"Pipeline finished in {summary['total_wall_time_s'] / 60:.1f} min ({summary['labels']}):\n"
          + "\n".join(lines) + f"\nSummary: {os.path.join(_WORKDIR.value, 'summary.json')} and summary.png")
    return 0


if __name__ == "__main__":
    from simclrv2_jax.cli import parse_flags

    app.run(main, flags_parser=parse_flags)
