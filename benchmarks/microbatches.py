"""Micro-batches (``config.microbatches``): the memory they save and the time they cost, measured.

    python -m benchmarks.microbatches            # both parts, each in its own process
    python -m benchmarks.microbatches memory     # R50-1x, 224 px, bf16, one device: 256/1, 1024/4, 4096/16
    python -m benchmarks.microbatches cost       # the CPU: fashion_mnist pretraining, batch 256, K=1 vs K=4

``memory`` compiles the pretraining step of R50-1x (``imagenet,r50_1x_sk0``, 224 px, bfloat16, the
host pipeline's float views as input, linear evaluation while pretraining) for one device at global
batch 256 in 1 micro-batch, 1024 in 4 and 4096 in 16 -- 256 images per micro-batch each time -- from
abstract shapes (``benchmarks.memory.measure``: nothing is allocated) and reads XLA's memory analysis:
peak = arguments + outputs - aliased + temporaries. The target: 4096 in 16 within 1.5x of 256 in 1.
The compiler is XLA's CPU compiler (its buffer assignment, not a GPU's), so the figures say how the
step's memory grows with the global batch, not a GPU's exact bytes.

``cost`` times the step itself, on this machine's CPU: the default Fashion-MNIST pretraining
(``fashion_mnist`` preset: ResNet-18 0.25x, 28 px) on synthetic batches of 256, plain (K=1) and in 4
micro-batches (the median of ``--steps`` steps after a first, compiling one), and reports seconds per
step and per example and their ratio: the price of the second forward pass, and of four smaller
batches where one large one was. On the CPU backend the micro-batch loops are unrolled
(``train/microbatches.py``: XLA's CPU backend runs backward convolutions inside a loop many times
slower), so this is the unrolled program's cost; an accelerator runs the loops.

Writes ``benchmarks/results/microbatches_memory.json`` and ``microbatches_cost.json``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

RESULTS = os.path.join(os.path.dirname(__file__), "results")
MEMORY_ROWS = ((256, 1), (1024, 4), (4096, 16))  # (global batch, micro-batches)
TARGET_RATIO = 1.5


def memory(args) -> None:
    from benchmarks import memory as memory_benchmark

    memory_benchmark.setup_environment(1)
    from benchmarks import common
    from simclrv2_jax.train import microbatches

    # The program an accelerator runs: the micro-batch loops as loops (the CPU backend unrolls them).
    microbatches.UNROLL_ON_CPU = False

    rows = []
    for global_batch, k in MEMORY_ROWS:
        row = memory_benchmark.measure(
            "r50_1x_sk0",
            1,
            "replicated",
            global_batch,
            "bfloat16",
            224,
            remat=False,
            scan_blocks=bool(args.scan_blocks),
            microbatches=k,
        )
        row["images_per_microbatch"] = global_batch // k
        rows.append(row)
        print(
            f"global batch {global_batch:5d} in {k:2d} micro-batches: peak {row['peak_gib']:6.2f} GiB "
            f"(arguments {row['argument_bytes'] / 2**30:.2f}, temporaries {row['temp_bytes'] / 2**30:.2f}; "
            f"compile {row['compile_s']:.0f} s)",
            flush=True,
        )
    base = rows[0]["peak_gib"]
    for row in rows:
        row["peak_vs_256_in_1"] = row["peak_gib"] / base
    common.write(
        os.path.join(RESULTS, "microbatches_memory.json"),
        {
            "what": "per-device peak memory of the compiled R50-1x pretraining step (224 px, bf16, one "
            "device) at a growing global batch in micro-batches of 256 images (XLA memory_analysis, "
            "abstract shapes)",
            "target": f"4096 in 16 within {TARGET_RATIO}x of 256 in 1",
            "meets_target": rows[-1]["peak_vs_256_in_1"] <= TARGET_RATIO,
            "backend_compiled_for": "cpu (XLA's CPU compiler; no accelerator measured)",
            "microbatch_loops": "lax.scan loops, as on an accelerator (not unrolled)",
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "rows": rows,
            "machine": common.machine(),
            "date": common.now(),
        },
    )


def cost(args) -> None:
    """Both steps compiled, then timed in turn (K=1, K, K=1, ...): a machine shared with other work
    slows both alike."""
    import statistics

    import jax

    from benchmarks import common
    from benchmarks.train_step import step_batch, synthetic_source
    from simclrv2_jax import config as config_lib
    from simclrv2_jax.train import microbatches, parallel, pretrain

    def timed(run: dict) -> float:
        """Seconds of one step of ``run`` (to its metrics on the host); the state moves on."""
        t0 = time.perf_counter()
        run["state"], metrics = run["step"](run["state"], run["batch"])
        jax.block_until_ready(metrics)
        return time.perf_counter() - t0

    runs = []
    for k in (1, args.microbatches):
        config = config_lib.get_config("pretrain", "fashion_mnist")
        config.train_batch_size = args.batch
        config.train_steps = 1000
        config.microbatches = k
        mesh = parallel.create_mesh()
        task = pretrain.build(config, mesh, source=synthetic_source(config))
        rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
        step = jax.jit(
            task.train_step, in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=(0,)
        )
        run = {"k": k, "task": task, "step": step, "times": []}
        run["state"] = jax.jit(lambda task=task: task.init_state(0), out_shardings=rep)()
        run["batch"] = jax.device_put(step_batch(task, config, args.batch), data)
        run["first"] = timed(run)
        runs.append(run)
    for _ in range(args.steps):
        for run in runs:
            run["times"].append(timed(run))
    rows = []
    for run in runs:
        median = statistics.median(run["times"])
        rows.append(
            {
                "microbatches": run["k"],
                "global_batch": args.batch,
                "compile_and_first_step_s": run["first"],
                "step_s_median": median,
                "step_s_all": run["times"],
                "s_per_example": median / args.batch,
                "augment_on_device": run["task"].augment_on_device,
                "microbatches_per_loop_step": microbatches.loop_unroll(run["k"]),
            }
        )
        print(f"K={run['k']}: {median:.3f} s per step (median of {args.steps})", flush=True)
    plain, micro = rows
    common.write(
        os.path.join(RESULTS, "microbatches_cost.json"),
        {
            "what": "seconds per pretraining step, plain and in micro-batches (the fashion_mnist preset, "
            "synthetic batches, this machine's CPU; the two steps timed in turn)",
            "preset": "fashion_mnist",
            "model": {name: config[name] for name in ("resnet_depth", "width_multiplier", "image_size")},
            "rows": rows,
            "cost_ratio": micro["step_s_median"] / plain["step_s_median"],
            "machine": common.machine(),
            "date": common.now(),
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("part", nargs="?", choices=["memory", "cost"], help="one part (default: both)")
    parser.add_argument("--scan_blocks", type=int, default=1, help="1: each group's blocks as one loop")
    parser.add_argument("--batch", type=int, default=256, help="cost: the global batch")
    parser.add_argument("--microbatches", type=int, default=4, help="cost: against 1")
    parser.add_argument("--steps", type=int, default=7, help="cost: timed steps of each after the first")
    args = parser.parse_args()
    if args.part == "memory":
        memory(args)
    elif args.part == "cost":
        cost(args)
    else:  # each part sets up JAX its own way: one process each, one after the other
        for part in ("memory", "cost"):
            subprocess.run([sys.executable, "-m", "benchmarks.microbatches", part, *sys.argv[1:]], check=True)


if __name__ == "__main__":
    main()
