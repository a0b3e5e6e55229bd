"""The memory of negatives (``memory_size``) on and off at small batches, on Fashion-MNIST.

    python -m benchmarks.moco_memory                              # batches 64 and 128, seed 0
    python -m benchmarks.moco_memory --seeds=0,1,2 --steps=600

For each batch size, seed and setting (memory off / on) it pretrains with the
``pretrain.py:fashion_mnist`` preset for the same number of steps (``--steps``; the same seeds, so
the same data order and augmentations), then fine-tunes on 1% of the labels with the
``finetune.py:fashion_mnist`` preset (the default job's fine-tuning). It records the linear-evaluation
top-1 of the pretraining (its head trained while pretraining, on the test split), the fine-tuned top-1,
and the pretraining's time per step (mean over the steps after the first ten, from a step hook, so
compilation and the final evaluation are left out). Writes ``benchmarks/results/moco_memory.json``.

The memory's settings default to what suits runs this short: ``--memory_size=16384`` (the last 128
steps' projections at batch 64, 64 at batch 128) and ``--moco_momentum=0.99`` (a time constant of 100
steps; the paper's 0.999 over a run of a few hundred steps would fill the queue from an almost
untrained memory network). Finished runs are not run again (one workdir each under ``--runs``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from benchmarks import common
from simclrv2_jax.config import get_config
from simclrv2_jax.train import train_stage


def pretrain(workdir: str, batch: int, steps: int, seed: int, memory_size: int, momentum: float) -> dict:
    done = common.finished(workdir)
    if done is not None:
        return done
    config = get_config("pretrain", "fashion_mnist")
    config.train_batch_size = batch
    config.train_steps = steps
    config.seed = seed
    config.memory_size = memory_size
    config.moco_momentum = momentum
    config.checkpoint_steps = steps
    times: list[float] = []
    results = train_stage(config, workdir, step_hooks=[lambda step, state: times.append(time.perf_counter())])
    results.pop("state", None)
    intervals = [b - a for a, b in zip(times[10:], times[11:])]
    results["step_time_s"] = statistics.mean(intervals) if intervals else None
    common.write(os.path.join(workdir, "step_time.json"), {"step_time_s": results["step_time_s"]})
    return results


def step_time(workdir: str) -> float | None:
    import json

    try:
        with open(os.path.join(workdir, "step_time.json")) as f:
            return json.load(f)["step_time_s"]
    except (OSError, ValueError, KeyError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="64,128")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=300, help="pretraining steps of every run")
    parser.add_argument("--memory_size", type=int, default=16384)
    parser.add_argument("--moco_momentum", type=float, default=0.99)
    parser.add_argument("--runs", default="runs/bench_moco_memory")
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "moco_memory.json")
    )
    args = parser.parse_args()
    from simclrv2_jax.cli import start_up

    start_up()
    report = {
        "date": common.now(),
        "machine": common.machine(),
        "pretrain_preset": "pretrain.py:fashion_mnist",
        "finetune_preset": "finetune.py:fashion_mnist (600 labels, 1%)",
        "pretrain_steps": args.steps,
        "memory_size": args.memory_size,
        "moco_momentum": args.moco_momentum,
        "rows": [],
    }
    for batch in [int(b) for b in args.batches.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for memory_size in (0, args.memory_size):
                name = f"b{batch}_seed{seed}_memory{memory_size}"
                pre_dir = os.path.abspath(os.path.join(args.runs, name, "pretrain"))
                pre = pretrain(pre_dir, batch, args.steps, seed, memory_size, args.moco_momentum)
                ft = common.train_or_reuse(
                    os.path.join(args.runs, name, "finetune"),
                    "finetune",
                    "fashion_mnist",
                    checkpoint=pre_dir,
                    seed=seed,
                )
                row = {
                    "batch": batch,
                    "seed": seed,
                    "memory_size": memory_size,
                    "linear_eval_top1": pre["eval"]["top1"],
                    "finetune_1pct_top1": ft["eval"]["top1"],
                    "pretrain_step_time_s": step_time(pre_dir),
                    "pretrain_final_contrast_loss": pre["train"]["contrast_loss"],
                }
                report["rows"].append(row)
                print(row, flush=True)
                common.write(args.out, report)


if __name__ == "__main__":
    main()
