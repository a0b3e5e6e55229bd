"""CPU convolution benchmark: XLA's own conv vs `simclrv2_jax.models.conv.conv2d`.

For each layer it times the forward, the input gradient (dx), the weight gradient (dw) and the
whole forward + backward (both gradients), reports GFLOP/s (2 * N*Ho*Wo * kh*kw * Cin*Cout flops for
each of the three convolutions) and writes benchmarks/results/conv_cpu.json.

    python -m benchmarks.conv_cpu                 # the representative layers
    python -m benchmarks.conv_cpu --sweep         # also every backward method of every layer
    python -m benchmarks.conv_cpu --extra         # also ResNet-50-sized layers

The machines are shared and have 2 cores: measurements of XLA and of the new path are interleaved
call by call, so background load hits both alike; the median and the best of the repeats are kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from simclrv2_jax.models import conv as conv_lib

# name, batch, height(=width), cin, cout, kernel, stride, padding
LAYERS = [
    ("3x3 128->128 16x16 b128", 128, 16, 128, 128, 3, 1, "SAME"),
    ("3x3 16->16 28x28 b256", 256, 28, 16, 16, 3, 1, "SAME"),
    ("3x3 32->32 14x14 b256", 256, 14, 32, 32, 3, 1, "SAME"),
    ("3x3 64->64 7x7 b256", 256, 7, 64, 64, 3, 1, "SAME"),
    ("1x1 64->256 7x7 b256", 256, 7, 64, 256, 1, 1, "SAME"),
    # Fixed padding of a stride-2 3x3 conv: 1 before and 1 after, then VALID.
    ("3x3 s2 32->64 28x28 b256", 256, 28, 32, 64, 3, 2, ((1, 1), (1, 1))),
    ("3x3 3->16 28x28 b256 (stem)", 256, 28, 3, 16, 3, 1, "SAME"),
]
EXTRA_LAYERS = [
    # Large activations, where XLA's weight gradient falls off.
    ("3x3 128->128 16x16 b256", 256, 16, 128, 128, 3, 1, "SAME"),
    ("3x3 64->64 32x32 b128", 128, 32, 64, 64, 3, 1, "SAME"),
    ("3x3 32->32 32x32 b256", 256, 32, 32, 32, 3, 1, "SAME"),
    ("3x3 64->64 56x56 b16", 16, 56, 64, 64, 3, 1, "SAME"),
    ("3x3 128->128 28x28 b16", 16, 28, 128, 128, 3, 1, "SAME"),
    ("3x3 256->256 14x14 b16", 16, 14, 256, 256, 3, 1, "SAME"),
    ("3x3 512->512 7x7 b16", 16, 7, 512, 512, 3, 1, "SAME"),
    ("3x3 96->96 16x16 b128", 128, 16, 96, 96, 3, 1, "SAME"),
    ("3x3 64->128 16x16 b128", 128, 16, 64, 128, 3, 1, "SAME"),
    ("3x3 s2 64->128 16x16 b128", 128, 16, 64, 128, 3, 2, ((1, 1), (1, 1))),
    ("3x3 s2 128->256 28x28 b16", 16, 28, 128, 256, 3, 2, ((1, 1), (1, 1))),
    ("1x1 256->64 14x14 b64", 64, 14, 256, 64, 1, 1, "SAME"),
    ("1x1 s2 64->128 28x28 b256", 256, 28, 64, 128, 1, 2, "VALID"),
    ("7x7 s2 3->64 64x64 b64 (stem)", 64, 64, 3, 64, 7, 2, ((3, 3), (3, 3))),
]


def _time(fns, args, repeats):
    """Median and best seconds per function, calls interleaved round-robin."""
    for f in fns:  # compile and warm up
        jax.block_until_ready(f(*args))
        jax.block_until_ready(f(*args))
    times = [[] for _ in fns]
    for _ in range(repeats):
        for f, ts in zip(fns, times):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            ts.append(time.perf_counter() - t0)
    return [(float(np.median(ts)), float(np.min(ts))) for ts in times]


def _functions(conv):
    """jitted fwd, dx, dw and fwd+bwd for `conv(x, kernel)`."""
    fwd = jax.jit(conv)
    dx = jax.jit(lambda x, k, g: jax.vjp(lambda x_: conv(x_, k), x)[1](g)[0])
    dw = jax.jit(lambda x, k, g: jax.vjp(lambda k_: conv(x, k_), k)[1](g)[0])

    def full(x, k, g):
        y, pullback = jax.vjp(conv, x, k)
        return y, pullback(g)

    return {"fwd": fwd, "dx": dx, "dw": dw, "fwd+bwd": jax.jit(full)}


def bench_layer(spec, repeats, sweep):
    name, n, hw, cin, cout, k, s, padding = spec
    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (n, hw, hw, cin), jnp.float32)
    kernel = jax.random.normal(kk, (k, k, cin, cout), jnp.float32) / np.sqrt(k * k * cin)
    strides = (s, s)

    def xla(x_, k_):
        return conv_lib.xla_conv2d(x_, k_, strides=strides, padding=padding)

    def new(x_, k_):
        return conv_lib.conv2d(x_, k_, strides=strides, padding=padding)

    y = jax.eval_shape(xla, x, kernel)
    g = jax.random.normal(kg, y.shape, jnp.float32)
    flops = 2.0 * np.prod(y.shape) * k * k * cin
    plan = (
        conv_lib.cpu_plan(x.shape, kernel.shape, strides, padding)
        if conv_lib.fast_cpu_conv_enabled()
        else None
    )

    impls = {"xla": _functions(xla), "new": _functions(new)}
    result = {
        "name": name,
        "batch": n,
        "hw": hw,
        "cin": cin,
        "cout": cout,
        "kernel": k,
        "stride": s,
        "padding": str(padding),
        "gflop_per_conv": flops / 1e9,
        "plan": dict(zip(("fwd", "dx", "dw"), plan)) if plan else None,
    }
    args = (x, kernel, g)
    for part in ("fwd", "dx", "dw", "fwd+bwd"):
        fs = [impls["xla"][part], impls["new"][part]]
        a = args[:2] if part == "fwd" else args
        (xm, xb), (nm, nb) = _time(fs, a, repeats)
        convs = 3 if part == "fwd+bwd" else 1
        for impl, med, best in (("xla", xm, xb), ("new", nm, nb)):
            result.setdefault(impl, {})[part] = {
                "ms_median": med * 1e3,
                "ms_best": best * 1e3,
                "gflops_median": convs * flops / med / 1e9,
                "gflops_best": convs * flops / best / 1e9,
            }

    result["fwd+bwd_speedup_median"] = (
        result["xla"]["fwd+bwd"]["ms_median"] / result["new"]["fwd+bwd"]["ms_median"]
    )
    if sweep:
        result["sweep"] = {}
        for grad, methods in (("dx", conv_lib.DX_METHODS), ("dw", conv_lib.DW_METHODS)):
            fs, names = [], []
            for m in methods:
                dx_m, dw_m = (m, "xla") if grad == "dx" else ("xla", m)  # xla/xla is plain XLA

                def conv_m(x_, k_, dx_m=dx_m, dw_m=dw_m):
                    return conv_lib.conv2d_with_backward(
                        x_, k_, strides=strides, padding=padding, dx_method=dx_m, dw_method=dw_m
                    )

                fs.append(_functions(conv_m)[grad])
                names.append(m)
            for m, (med, best) in zip(names, _time(fs, args, repeats)):
                result["sweep"][f"{grad}:{m}"] = {
                    "gflops_median": flops / med / 1e9,
                    "gflops_best": flops / best / 1e9,
                }
    return result


def _print_row(r):
    def gf(impl, part):
        return r[impl][part]["gflops_median"]

    def ms(impl, part):
        return r[impl][part]["ms_median"]

    plan = "/".join(r["plan"].values()) if r["plan"] else "-"
    print(
        f"{r['name']:30s} {plan:20s} "
        f"{gf('xla', 'fwd'):6.1f} {gf('new', 'fwd'):6.1f} | "
        f"{gf('xla', 'dx'):6.1f} {gf('new', 'dx'):6.1f} | "
        f"{gf('xla', 'dw'):6.1f} {gf('new', 'dw'):6.1f} | "
        f"{ms('xla', 'fwd+bwd'):7.2f} {ms('new', 'fwd+bwd'):7.2f} "
        f"{ms('xla', 'fwd+bwd') / ms('new', 'fwd+bwd'):5.2f}x",
        flush=True,
    )
    if "sweep" in r:
        print(
            " " * 31
            + "custom-VJP sweep GFLOP/s (median/best): "
            + "  ".join(
                f"{k} {v['gflops_median']:.1f}/{v['gflops_best']:.1f}" for k, v in r["sweep"].items()
            ),
            flush=True,
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sweep", action="store_true", help="time every backward method too")
    parser.add_argument("--extra", action="store_true", help="add ResNet-50-sized layers")
    parser.add_argument(
        "--only", default="", help="comma-separated substrings: run only layers whose name contains one"
    )
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "conv_cpu.json"))
    args = parser.parse_args(argv)

    layers = LAYERS + (EXTRA_LAYERS if args.extra else [])
    patterns = args.only.split(",")
    layers = [spec for spec in layers if any(p in spec[0] for p in patterns)]
    print(
        f"jax {jax.__version__} backend {jax.default_backend()} cpus {os.cpu_count()} "
        f"fast path {'on' if conv_lib.fast_cpu_conv_enabled() else 'OFF'}; "
        f"GFLOP/s medians of {args.repeats}"
    )
    print(
        f"{'layer':30s} {'plan fwd/dx/dw':20s} {'fwd xla/new':>13s} | {'dx xla/new':>13s} | "
        f"{'dw xla/new':>13s} | {'fwd+bwd ms xla/new':>21s}"
    )
    load_start = os.getloadavg()
    results = []
    for spec in layers:
        results.append(bench_layer(spec, args.repeats, args.sweep))
        _print_row(results[-1])

    report = {
        "benchmark": "conv_cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "processor": _cpu_model(),
        "python": platform.python_version(),
        "fast_cpu_conv": conv_lib.fast_cpu_conv_enabled(),
        "repeats": args.repeats,
        # Other jobs share the 2 cores: a 1-minute load well above 1 means slower, noisier numbers.
        "loadavg_1min_start_end": [load_start[0], os.getloadavg()[0]],
        "flops_note": "GFLOP/s = 2*N*Ho*Wo*kh*kw*Cin*Cout per conv (fwd+bwd counts 3 convs)",
        "layers": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
