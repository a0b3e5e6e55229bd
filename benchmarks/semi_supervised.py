"""Semi-supervised benchmark: the pipeline vs a supervised-only baseline on Fashion-MNIST.

    python -m benchmarks.semi_supervised                    # 1%, 0.1% and 10% labels, default budgets
    python -m benchmarks.semi_supervised --fractions=0.01   # one split

For each label fraction it runs pretrain -> fine-tune -> distill and the baselines (the same
networks trained from scratch on the same labels: the fine-tuned one's, and the smaller student's)
with the default Fashion-MNIST configs, whose step counts are the compute budget, stated per stage in
the JSON; distillation's gain is counted against the student's own baseline. The 1% run is
exactly the default job and uses its workdir (``runs/fashion_mnist_1pct``), so after
``launch/quickstart.sh`` it is not trained again; it runs first, and the others copy its
pretraining.
Pretraining does not look at labels, so the 10% run reuses that pretraining (copied, then skipped by
the pipeline as finished). With ten times the labels, its fine-tuning and the baseline run 10 epochs
instead of 30 (the paper shortens its 10% schedule too), which keeps the run within minutes; with
fewer labels than 1% they run as many steps as at 1% (more epochs). Writes
``benchmarks/results/semi_supervised.json`` (test top-1 of every stage, steps, wall times, machine)
and ``semi_supervised.png`` (top-1 against the share of labels: the paper's "the fewer the labels,
the bigger the gain").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

from benchmarks import common
from simclrv2_jax.config import get_config
from simclrv2_jax.train.pipeline import PIPELINE_STAGES, run_pipeline, stage_configs

STAGES = list(PIPELINE_STAGES)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fractions", default="0.01,0.001,0.1")
    parser.add_argument("--runs", default="runs", help="fraction f runs in RUNS/fashion_mnist_<100f>pct")
    parser.add_argument("--epochs_10pct", type=float, default=10.0)
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "semi_supervised.json")
    )
    args = parser.parse_args()
    from simclrv2_jax.cli import start_up

    start_up()

    results = {
        "date": common.now(),
        "machine": common.machine(),
        "runs": {},
    }
    first_pretrain = None
    for fraction in [float(f) for f in args.fractions.split(",")]:
        workdir = os.path.join(args.runs, f"fashion_mnist_{fraction * 100:g}pct")
        ft = get_config("finetune", "fashion_mnist")
        base = get_config("finetune", "fashion_mnist,baseline")
        ft.label_fraction = fraction
        if fraction > 0.01:
            ft.train_epochs = base.train_epochs = args.epochs_10pct
            # The baseline's warmup stays a sixth of its run at most (its preset: 5 of 30 epochs),
            # so that a shorter run is still mostly trained at the full learning rate.
            base.warmup_epochs = min(base.warmup_epochs, base.train_epochs / 6)
        elif fraction < 0.01:  # the 1% run's steps
            ft.train_epochs = base.train_epochs = ft.train_epochs * 0.01 / fraction
        configs = stage_configs(
            get_config("pretrain", "fashion_mnist"), ft, get_config("distill", "fashion_mnist"), base, workdir
        )
        if first_pretrain and not os.path.exists(os.path.join(workdir, "pretrain")):
            shutil.copytree(first_pretrain, os.path.join(workdir, "pretrain"))
        summary = run_pipeline(configs, workdir, STAGES)
        first_pretrain = first_pretrain or os.path.join(workdir, "pretrain")
        top1, ran = summary["test_top1"], list(summary["stages"])
        # A smaller student is measured against its own network trained on the labels alone.
        student_base = "student_baseline" if "student_baseline" in ran else "baseline"
        results["runs"][f"{fraction:g}"] = {
            "labels": summary["labels"],
            "num_labeled_examples": summary["stages"]["finetune"].get("num_labeled_examples"),
            "test_top1": summary["test_top1"],
            "budget_steps": {
                s: {"steps": summary["stages"][s]["final_step"], "global_batch": configs[s].train_batch_size}
                for s in ran
            },
            "wall_time_s": {
                s: summary["stages"][s].get("stage_wall_time_s", summary["stages"][s]["wall_time_s"])
                for s in ran
            },
            "gain_over_baseline": {
                "finetune": top1["finetune"] - top1["baseline"],
                "distill": top1["distill"] - top1[student_base],
            },
            "distill_compared_with": student_base,
        }
        print(json.dumps(results["runs"][f"{fraction:g}"], indent=2))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    plot(results, os.path.splitext(args.out)[0] + ".png")
    print(f"wrote {args.out}")


def plot(results: dict, path: str) -> None:
    """Test top-1 of fine-tuning, distillation and the baselines against the share of labels."""
    from matplotlib.figure import Figure

    runs = sorted(results["runs"].items(), key=lambda kv: float(kv[0]))
    shares = [100 * float(f) for f, _ in runs]
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    styles = {"finetune": ("fine-tuned", "tab:green"), "distill": ("distilled", "tab:purple")}
    styles["baseline"] = ("supervised only", "tab:red")
    styles["student_baseline"] = ("student's network, supervised only", "tab:pink")
    for stage, (label, color) in styles.items():
        if any(r["test_top1"].get(stage) is None for _, r in runs):
            continue
        ax.plot(shares, [100 * r["test_top1"][stage] for _, r in runs], "o-", color=color, label=label)
    ax.set_xscale("log")
    ax.set_xticks(shares, [f"{s:g}%" for s in shares])
    ax.set_xlabel("labels used (of 60,000)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Fashion-MNIST: the fewer the labels, the bigger the gain")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
