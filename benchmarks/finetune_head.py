"""Fine-tuning with the kept projection layer fixed (TF1 release) or trained (TF2 release).

    python -m benchmarks.finetune_head                      # from the default job's pretraining
    python -m benchmarks.finetune_head --seeds=0,1,2,3,4

Fine-tunes the same pretraining checkpoint with the ``finetune.py:fashion_mnist`` preset (the
default job's fine-tuning) once per seed with ``train_proj_head_in_finetune`` False and True, the
rest identical, and writes the test top-1 of every run, their mean and standard deviation to
``benchmarks/results/finetune_head.json``. This is how the Fashion-MNIST preset's value was chosen.
Finished runs are not run again (each has its own workdir under ``--runs``).
"""

from __future__ import annotations

import argparse
import os
import statistics

from benchmarks import common


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrain", default="runs/fashion_mnist_1pct/pretrain")
    parser.add_argument("--runs", default="runs/bench_finetune_head")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "finetune_head.json")
    )
    args = parser.parse_args()
    from simclrv2_jax.cli import start_up

    start_up()
    if not os.path.isdir(args.pretrain):
        raise SystemExit(
            f"error: no pretraining run at {args.pretrain}. Run the default job first "
            "(bash launch/quickstart.sh) or pass --pretrain=WORKDIR."
        )
    seeds = [int(s) for s in args.seeds.split(",")]
    report = {
        "date": common.now(),
        "machine": common.machine(),
        "pretrain_checkpoint": args.pretrain,
        "preset": "finetune.py:fashion_mnist",
        "settings": {},
    }
    for train_head in (False, True):
        name = "trained" if train_head else "fixed"
        runs = {}
        for seed in seeds:
            workdir = os.path.join(args.runs, f"{name}_seed{seed}")
            results = common.train_or_reuse(
                workdir,
                "finetune",
                "fashion_mnist",
                checkpoint=args.pretrain,
                train_proj_head_in_finetune=train_head,
                seed=seed,
            )
            runs[str(seed)] = {
                "test_top1": results["eval"]["top1"],
                "test_loss": results["eval"]["loss"],
                "steps": results["final_step"],
                "train_loop_time_s": results.get("train_loop_time_s"),
            }
        top1 = [r["test_top1"] for r in runs.values()]
        report["settings"][f"train_proj_head_in_finetune={train_head}"] = {
            "runs": runs,
            "mean_top1": statistics.mean(top1),
            "std_top1": statistics.stdev(top1) if len(top1) > 1 else 0.0,
        }
        print(name, top1)
    common.write(args.out, report)


if __name__ == "__main__":
    main()
