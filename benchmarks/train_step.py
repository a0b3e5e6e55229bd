"""Throughput of a stage's jitted train step on synthetic global batches (no input pipeline).

    python -m benchmarks.train_step --preset=fashion_mnist --batch=256 --steps=10
    python -m benchmarks.train_step --preset=imagenet,r50_1x_sk0 --batch=256 --dtype=bfloat16
    python -m benchmarks.train_step --preset=imagenet,r50_1x_sk0 --batch=256 --dtype=bfloat16 \
        --torch_peer=eager,compile        # the PyTorch peer in the same call, on the same GPU

Writes ``benchmarks/results/train_step_<stage>_<preset>.json`` with compile time, seconds per step
(median of ``--steps``), images/s (counting both views in pretraining), the model FLOPs of one step
(XLA's cost analysis of the compiled step) and MFU against the device's dense peak where it is known,
the PyTorch peer's figures when asked, and the machine.

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

from benchmarks.common import cpu_info
from simclrv2_jax import config as config_lib
from simclrv2_jax.config import fields
from simclrv2_jax.data.sources import InMemorySource
from simclrv2_jax.train import STAGE_MODULES, parallel


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


DEFAULT_PEER = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench", "torch_peer.py")

# Dense peak FLOP/s per device for MFU, by device kind (substring) and compute dtype.
PEAK_TFLOPS = {
    ("H100", "bfloat16"): 989.4,
    ("H200", "bfloat16"): 989.4,
    ("A100", "bfloat16"): 312.0,
    ("H100", "float32"): 66.9,  # without TF32
    ("H200", "float32"): 66.9,
    ("A100", "float32"): 19.5,
    ("TPU v4", "bfloat16"): 275.0,
    ("TPU v5p", "bfloat16"): 459.0,
    ("TPU v5 lite", "bfloat16"): 197.0,
}


def step_flops(step, state, batch, extra) -> float | None:
    """Model FLOPs of one compiled step, from XLA's cost analysis (None where it gives none)."""
    try:
        analysis = step.lower(state, batch, *extra).compile().cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops else None


def mfu(flops: float | None, step_s: float, dtype: str, peak_tflops: float) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the device's dense peak (known devices only)."""
    if not flops:
        return None
    if not peak_tflops:
        kind = jax.devices()[0].device_kind
        peak_tflops = next((v for (k, d), v in PEAK_TFLOPS.items() if k in kind and d == dtype), 0.0)
    if not peak_tflops:
        return None
    return flops / step_s / (peak_tflops * 1e12 * jax.device_count())


def run_torch_peer(script: str, batch: int, kinds: list[str]) -> dict:
    """The PyTorch peer's SimCLR step on this machine, eager and/or compiled, as it reports itself."""
    import subprocess
    import sys

    results = {}
    for kind in kinds:
        proc = subprocess.run(
            [sys.executable, script, str(batch), "1" if kind == "compile" else "0"],
            capture_output=True,
            text=True,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            results[kind] = {"error": (proc.stderr or proc.stdout)[-1500:]}
        else:
            results[kind] = json.loads(lines[-1])
    return results


def step_batch(task, config, batch_size: int) -> dict:
    """A synthetic global batch as the step takes it: raw uint8 images where the stage augments on
    the device, else augmented float views, as the host pipeline hands them."""
    rng = np.random.default_rng(0)
    views = 2 if config.stage == "pretrain" else 1
    shape = (batch_size, config.image_size, config.image_size, 3)
    if task.augment_on_device:
        image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    else:
        image = rng.uniform(size=(shape[0], views, *shape[1:]) if views > 1 else shape).astype(np.float32)
    return {
        "image": image,
        "label": rng.integers(0, 10, size=batch_size).astype(np.int32),
        "mask": np.ones(batch_size, np.float32),
    }


def time_step(task, config, mesh, batch: dict, steps: int, peak_tflops: float = 0.0) -> dict:
    """Compiles ``task.train_step`` as the loop does (state replicated, batch on the data axis, state
    donated) and times ``steps`` steps after the first: seconds per step, images/s (both views counted
    in pretraining), model FLOPs (XLA's cost analysis) and MFU where the device's peak is known."""
    rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    state = jax.jit(lambda: task.init_state(0), out_shardings=rep)()
    batch = jax.device_put(batch, data)
    step = jax.jit(
        task.train_step,
        in_shardings=(rep, data, *task.extra_shardings),
        out_shardings=(rep, rep),
        donate_argnums=(0,),
    )
    t0 = time.perf_counter()  # tracing, compiling and one step
    flops = step_flops(step, state, batch, task.extra)
    state, metrics = step(state, batch, *task.extra)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch, *task.extra)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    per_step = statistics.median(times)
    views = 2 if config.stage == "pretrain" else 1
    images = len(batch["label"])
    return {
        "global_batch": images,
        "dtype": config.compute_dtype,
        "image_size": config.image_size,
        "model": {k: config[k] for k in fields.ARCH_FIELDS},
        "augment_on_device": task.augment_on_device,
        "compile_and_first_step_s": compile_s,
        "step_s_median": per_step,
        "step_s_min": min(times),
        "steps_per_s": 1.0 / per_step,
        "images_per_s": images * views / per_step,
        "model_flops_per_step": flops,
        "model_tflops_per_s": flops / per_step / 1e12 if flops else None,
        "mfu": mfu(flops, per_step, config.compute_dtype, peak_tflops),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", default="pretrain", choices=["pretrain", "finetune"])
    parser.add_argument("--preset", default="fashion_mnist")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no_guard", action="store_true", help="time the step without the guard")
    parser.add_argument("--memory_size", type=int, default=0, help="pretraining's memory of negatives")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--torch_peer",
        default="",
        help="also run the PyTorch peer step (../shared/bench/torch_peer.py) in this call: "
        "'eager', 'compile' or 'eager,compile' (needs PyTorch with CUDA)",
    )
    parser.add_argument("--torch_peer_script", default=DEFAULT_PEER)
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="peak for MFU; 0: known devices")
    args = parser.parse_args()
    if args.no_guard:
        from simclrv2_jax.train import step as step_module

        def unguarded(state, updated, metrics, max_skipped):
            zero = jax.numpy.zeros((), jax.numpy.float32)
            return updated, {**metrics, **{k: zero for k in step_module.GUARD_METRICS}}

        step_module.guarded_update = unguarded

    import importlib

    config = config_lib.get_config(args.stage, args.preset)
    config.train_batch_size = args.batch
    config.compute_dtype = args.dtype
    config.train_steps = 1000
    if args.memory_size:
        config.memory_size = args.memory_size
    if args.stage == "finetune":
        config.checkpoint = ""
    mesh = parallel.create_mesh()
    task = importlib.import_module(STAGE_MODULES[args.stage]).build(
        config, mesh, source=synthetic_source(config)
    )

    timed = time_step(task, config, mesh, step_batch(task, config, args.batch), args.steps, args.peak_tflops)
    result = {
        "stage": args.stage,
        "preset": args.preset,
        **timed,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "finite_state_guard": not args.no_guard,
        "memory_size": args.memory_size,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "cpu": cpu_info(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if args.torch_peer:
        result["torch_peer"] = run_torch_peer(args.torch_peer_script, args.batch, args.torch_peer.split(","))
        ours = result["images_per_s"]
        for peer in result["torch_peer"].values():
            if "views_per_s" in peer:
                peer["ratio_ours_to_peer"] = ours / peer["views_per_s"]
    print(json.dumps(result, indent=2))
    out = args.out or os.path.join(
        os.path.dirname(__file__), "results", f"train_step_{args.stage}_{args.preset.replace(',', '_')}.json"
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
