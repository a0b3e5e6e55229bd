"""Throughput of a stage's jitted train step on synthetic global batches (no input pipeline).

    python -m benchmarks.train_step --preset=fashion_mnist --batch=256 --steps=10
    python -m benchmarks.train_step --preset=imagenet,r50_1x_sk0 --batch=256 --dtype=bfloat16

Writes ``benchmarks/results/train_step_<stage>_<preset>.json`` with compile time, seconds per step
(median of ``--steps``), images/s (counting both views in pretraining) and the machine. Run it with
``SIMCLR_FAST_CPU_CONV=0`` to measure XLA's own convolution path on the CPU for comparison.

When the stage augments on the device (the default on accelerators and for in-memory data), the
batch is raw uint8 images and the augmentation is part of the timed step. ``--no_guard`` replaces
the finite-state guard (``step.guarded_update``) by a plain update, to measure what the guard costs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import jax
import numpy as np

from simclrv2_jax import fields, parallel
from simclrv2_jax.data.sources import InMemorySource
from simclrv2_jax.train import STAGE_MODULES
from simclrv2_jax.train.state import create_train_state


def synthetic_source(config, num_classes: int = 10) -> InMemorySource:
    """Random uint8 images of the config's size, so the benchmark needs no data set."""
    rng = np.random.default_rng(0)
    n = 512
    images = rng.integers(0, 256, size=(n, config.image_size, config.image_size, 3), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=n).astype(np.int64)
    return InMemorySource(
        name="synthetic",
        num_classes=num_classes,
        data={config.train_split: (images, labels), config.eval_split: (images, labels)},
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", default="pretrain", choices=["pretrain", "finetune"])
    parser.add_argument("--preset", default="fashion_mnist")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no_guard", action="store_true", help="time the step without the guard")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.no_guard:
        from simclrv2_jax.train import step as step_module

        def unguarded(state, updated, metrics, max_skipped):
            zero = jax.numpy.zeros((), jax.numpy.float32)
            return updated, {**metrics, **{k: zero for k in step_module.GUARD_METRICS}}

        step_module.guarded_update = unguarded

    import importlib

    config = fields.get_config(args.stage, args.preset)
    config.train_batch_size = args.batch
    config.compute_dtype = args.dtype
    config.train_steps = 1000
    if args.stage == "finetune":
        config.checkpoint = ""
    mesh = parallel.create_mesh()
    task = importlib.import_module(STAGE_MODULES[args.stage]).build(
        config, mesh, source=synthetic_source(config)
    )

    rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    state = jax.jit(lambda: create_train_state(task.init_variables, task.tx, 0), out_shardings=rep)()
    views = 2 if args.stage == "pretrain" else 1
    rng = np.random.default_rng(0)
    shape = (args.batch, config.image_size, config.image_size, 3)
    if task.augment_on_device:  # the synthetic source's raw uint8 images: the step augments them
        image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    else:  # what the host pipeline hands the step: augmented float views
        image = rng.uniform(size=(shape[0], views, *shape[1:]) if views > 1 else shape).astype(np.float32)
    batch = {
        "image": image,
        "label": rng.integers(0, 10, size=args.batch).astype(np.int32),
        "mask": np.ones(args.batch, np.float32),
    }
    batch = jax.device_put(batch, data)
    step = jax.jit(
        task.train_step,
        in_shardings=(rep, data, *task.extra_shardings),
        out_shardings=(rep, rep),
        donate_argnums=(0,),
    )
    t0 = time.perf_counter()
    state, metrics = step(state, batch, *task.extra)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch, *task.extra)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    per_step = statistics.median(times)
    result = {
        "stage": args.stage,
        "preset": args.preset,
        "global_batch": args.batch,
        "dtype": args.dtype,
        "model": {k: config[k] for k in fields.ARCH_FIELDS},
        "image_size": config.image_size,
        "fast_cpu_conv": os.environ.get("SIMCLR_FAST_CPU_CONV", "1") != "0",
        "augment_on_device": task.augment_on_device,
        "finite_state_guard": not args.no_guard,
        "compile_and_first_step_s": compile_s,
        "step_s_median": per_step,
        "step_s_min": min(times),
        "images_per_s": args.batch * views / per_step,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print(json.dumps(result, indent=2))
    out = args.out or os.path.join(
        os.path.dirname(__file__), "results", f"train_step_{args.stage}_{args.preset.replace(',', '_')}.json"
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
