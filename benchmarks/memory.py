"""Per-device memory of the compiled pretraining step, replicated vs fsdp, from abstract shapes.

    python -m benchmarks.memory                                   # the README table
    python -m benchmarks.memory --models=r50_1x_sk0 --devices=8 --layouts=fsdp

For each model, device count and parameter layout, the pretraining train step (224 px ImageNet
config, ``--per_device_batch`` images = twice as many views per device) is lowered over a mesh of
that many devices and compiled by XLA, with abstract shapes only: no parameter, optimiser slot or
image is ever allocated. XLA's ``memory_analysis()`` of the partitioned program gives one device's
bytes: arguments (the train state and the batch), outputs, the part of the outputs that reuses the
donated arguments, and temporaries (activations, gradients, workspace). Peak = arguments + outputs
- aliased + temporaries.

The devices are virtual CPU devices (``--xla_force_host_platform_device_count``), so the figures
come from XLA's CPU compiler: its buffer assignment, not a TPU's. The parameter and optimiser bytes
are exact for any backend; the temporaries are indicative (a TPU's fusion and layouts differ).

Writes ``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import sys
import time

MAX_DEVICES = 128


def setup_environment(devices: int) -> None:
    """XLA flags for compiling to measure memory (before JAX is imported): ``devices`` virtual CPU
    devices, a fast compile and the memory-minimising scheduler."""
    if "jax" in sys.modules:
        raise RuntimeError("the memory benchmarks must set XLA_FLAGS before JAX is imported")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    # LLVM's optimisation of the CPU code changes no buffer (same bytes for R50 either way), only
    # the compile time, which dominates this benchmark.
    fast_compile = ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
    # The CPU compiler's default scheduler stretches buffers' lives so that independent operations
    # can run side by side on the cores; a question about memory wants its memory-minimising one
    # (R152-3x-SK1, fsdp, remat, 8 devices: 22.4 -> 19.8 GiB).
    memory_scheduler = ["--xla_cpu_enable_concurrency_optimized_scheduler=false"]
    os.environ["XLA_FLAGS"] = " ".join(
        flags + fast_compile + memory_scheduler + [f"--xla_force_host_platform_device_count={devices}"]
    )
    os.environ["JAX_PLATFORMS"] = "cpu"


def measure(
    model: str,
    devices: int,
    layout_name: str,
    per_device_batch: int,
    dtype: str,
    image_size: int,
    remat: bool,
    scan_blocks: bool = False,
    microbatches: int = 1,
):
    import jax
    import numpy as np

    from benchmarks.train_step import synthetic_source
    from simclrv2_jax import config as config_lib
    from simclrv2_jax.train import parallel, pretrain

    config = config_lib.get_config("pretrain", f"imagenet,{model}")
    config.image_size = image_size
    config.train_batch_size = per_device_batch * devices
    config.compute_dtype = dtype
    config.train_steps = 1000
    config.augment_on_device = False  # the host pipeline hands the step augmented float views
    config.param_sharding = layout_name
    config.remat = remat
    config.scan_blocks = scan_blocks
    config.microbatches = microbatches
    config.lineareval_while_pretraining = True  # as the release pretrains
    mesh = parallel.create_mesh(devices)
    small = config.copy_and_resolve_references()
    small.image_size = 8  # the synthetic source only names the shapes; keep its arrays small
    task = pretrain.build(config, mesh, source=synthetic_source(small, num_classes=1000))
    layout = parallel.ParamLayout(mesh, layout_name, config.fsdp_min_size)

    abstract = jax.eval_shape(lambda: task.init_state(0))
    state_sharding = layout.state_shardings(abstract)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding
    )
    data = parallel.data_sharding(mesh)
    batch_size = config.train_batch_size
    batch = {
        "image": jax.ShapeDtypeStruct((batch_size, 2, image_size, image_size, 3), np.float32, sharding=data),
        "label": jax.ShapeDtypeStruct((batch_size,), np.int32, sharding=data),
        "mask": jax.ShapeDtypeStruct((batch_size,), np.float32, sharding=data),
    }
    step = jax.jit(
        task.make_train_step(layout),
        in_shardings=(state_sharding, data),
        out_shardings=(state_sharding, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )
    t0 = time.perf_counter()
    compiled = step.lower(abstract, batch).compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    params = abstract.params
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return {
        "model": model,
        "devices": devices,
        "param_sharding": layout_name,
        "per_device_batch_images": per_device_batch,
        "per_device_views": 2 * per_device_batch,
        "global_batch": batch_size,
        "image_size": image_size,
        "compute_dtype": dtype,
        "remat": remat,
        "scan_blocks": scan_blocks,
        "microbatches": microbatches,
        "num_params": num_params,
        "params_bytes_per_device": layout.bytes_per_device(params),
        "opt_state_bytes_per_device": layout.bytes_per_device(abstract.opt_state),
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "peak_bytes": int(peak),
        "peak_gib": peak / 2**30,
        "compile_s": compile_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="r50_1x_sk0,r152_2x_sk1,r152_3x_sk1")
    parser.add_argument("--devices", default="8,32,128")
    parser.add_argument("--layouts", default="replicated,fsdp")
    parser.add_argument("--remat", default="0,1", help="without (0) and/or with (1) block remat")
    parser.add_argument(
        "--scan_blocks",
        default="1",
        help="blocks scanned (1, the default: R152 compiles in a minute) and/or unrolled (0)",
    )
    parser.add_argument("--per_device_batch", type=int, default=32, help="images (two views each)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--budget_gib", type=float, default=16.0, help="a TPU v3 core's HBM")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "memory.json"))
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows already in --out for other settings (model, devices, layout, remat)",
    )
    args = parser.parse_args()
    device_counts = [int(d) for d in args.devices.split(",")]
    setup_environment(max(device_counts))

    from benchmarks.common import cpu_info

    rows = []
    for model in args.models.split(","):
        for devices in device_counts:
            settings = itertools.product(
                args.layouts.split(","), args.remat.split(","), args.scan_blocks.split(",")
            )
            for layout, remat, scan in settings:
                row = measure(
                    model,
                    devices,
                    layout,
                    args.per_device_batch,
                    args.dtype,
                    args.image_size,
                    remat == "1",
                    scan == "1",
                )
                row["fits_budget"] = row["peak_gib"] <= args.budget_gib
                row["xla_flags"] = os.environ.get("XLA_FLAGS", "")
                rows.append(row)
                print(
                    f"{model:12s} {devices:4d} dev {layout:10s} remat {remat} scan {scan} params+opt "
                    f"{(row['params_bytes_per_device'] + row['opt_state_bytes_per_device']) / 2**30:6.2f} GiB"
                    f"  temp {row['temp_bytes'] / 2**30:6.2f} GiB  peak {row['peak_gib']:6.2f} GiB"
                    f"  (compile {row['compile_s']:.0f} s)",
                    flush=True,
                )
    import jax

    def key(row):
        return (
            row["model"],
            row["devices"],
            row["param_sharding"],
            row["remat"],
            row.get("scan_blocks", False),
        )

    if args.merge and os.path.exists(args.out):
        with open(args.out) as f:
            new = {key(r) for r in rows}
            rows = [r for r in json.load(f)["rows"] if key(r) not in new] + rows
    result = {
        "what": "per-device memory of the compiled pretraining step (XLA memory_analysis, abstract shapes)",
        "budget_gib": args.budget_gib,
        "rows": rows,
        "backend_compiled_for": "cpu (virtual devices)",
        "cpu": cpu_info(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
