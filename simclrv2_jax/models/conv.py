"""2-D convolution (NHWC x HWIO) with a faster training step on the CPU backend.

Why. A training step runs three convolutions per layer: forward, input gradient (dx) and weight
gradient (dw), and XLA's CPU backend is uneven across them. The measured figures behind every choice
below are in ``benchmarks/results/conv_cpu.json`` (``python -m benchmarks.conv_cpu --sweep --extra``
measures them on the machine at hand, per layer shape, XLA against the alternatives):

* 1x1 convs are slow in all three directions, dw worst; as one matmul they are several times
  faster. So a 1x1 conv is (strided slice of x) @ W, and JAX's autodiff of that gives the two
  gradient matmuls.
* XLA's dw of a kxk conv collapses on big layers (large batch times image size times channels),
  while a loop over the kernel taps of ``(N*Ho*Wo, Cin)^T @ (N*Ho*Wo, Cout)`` matmuls on shifted
  (strided) slices of the padded input ("taps") holds up. On smaller layers XLA's dw is as fast or
  faster, so taps is used only above a size threshold (``cpu_plan``) and, for strided convs, from
  128 channels up.
* Strided kxk convs: XLA computes dx by convolving a zero-dilated gradient. Splitting the kernel
  into its s*s stride-phase sub-kernels turns dx into one dense stride-1 conv with s*s*Cin output
  channels plus a depth-to-space reshape ("subpixel"), faster for few input channels on large
  images; elsewhere XLA's dx is already fast, and wins.
* Machines differ (AVX-512 against AVX2 only, for one), so which of these wins is measured on the
  machine itself: the first time a layer shape is differentiated, its candidates are timed and the
  fastest kept, stored on disk per machine (``conv_autotune.py``: the cache, the time bound, and
  ``SIMCLR_FAST_CPU_CONV``: ``0`` = XLA only, ``taps``, ``heuristic`` = the fixed rules of
  ``cpu_plan`` below, unset = measured).

How. `conv2d` decides at trace time, from the layer's static shapes: a 1x1 conv is a matmul or
XLA's conv, as measured (or as `cpu_plan` rules); a kxk conv is XLA's forward conv in a
`jax.custom_vjp` whose backward takes "subpixel" and/or "taps" where they measured faster, XLA's
own gradients elsewhere (chosen when the backward is traced, so evaluation measures nothing). On
GPU/TPU, with `SIMCLR_FAST_CPU_CONV=0`, for grouped convs, non-float dtypes or negative padding it
is exactly `lax.conv_general_dilated`. bf16 accumulates in f32 and returns the input dtype. Supports
`jit`, `grad` (grad of grad too) and `jax.checkpoint`; forward-mode AD (`jvp`, `jacfwd`) is not
defined for layers that take the custom VJP: set the variable to 0 for that. The variable is read
when a function is traced, so set it before the first `jit` call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
ENV_VAR = "SIMCLR_FAST_CPU_CONV"

Padding = str | int | Sequence[tuple[int, int]]

# Backward methods: for the input gradient (dx) and the weight gradient (dw).
DX_METHODS = ("xla", "subpixel")
DW_METHODS = ("xla", "taps")


def xla_conv2d(x, kernel, *, strides=(1, 1), padding: Padding = "SAME", feature_group_count=1):
    """Plain `lax.conv_general_dilated` with NHWC inputs and HWIO kernels."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=_pair(strides),
        padding=_lax_padding(padding),
        dimension_numbers=DIMENSION_NUMBERS,
        feature_group_count=feature_group_count,
    )


def cpu_conv_mode() -> str:
    """How `conv2d` picks its CPU paths, from `SIMCLR_FAST_CPU_CONV` (read when a function is traced).

    ``measure`` (unset or ``1``): by measurement on this machine (``conv_autotune``); ``heuristic``:
    the fixed rules of `cpu_plan`; ``taps``: the rules, and taps for every kxk weight gradient (for
    CPUs where XLA's own is always slow); ``xla`` (``0``): XLA's own convolution everywhere.
    """
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    modes = {"1": "measure", "": "measure", "measure": "measure", "heuristic": "heuristic", "taps": "taps"}
    modes.update({"0": "xla", "xla": "xla"})
    if value not in modes:
        raise ValueError(
            f"{ENV_VAR}={value!r} is not one of 1 (measure, the default), heuristic, taps, 0 (XLA only)."
        )
    return modes[value]


def fast_cpu_conv_enabled() -> bool:
    """Whether `conv2d` takes the CPU paths (on the CPU backend, unless `SIMCLR_FAST_CPU_CONV=0`)."""
    return jax.default_backend() == "cpu" and cpu_conv_mode() != "xla"


def conv2d(x, kernel, *, strides=(1, 1), padding: Padding = "SAME", feature_group_count=1):
    """NHWC x HWIO convolution; same result and gradients as `xla_conv2d`, faster on the CPU."""
    if feature_group_count != 1 or not fast_cpu_conv_enabled() or not _supported(x, kernel):
        return xla_conv2d(
            x, kernel, strides=strides, padding=padding, feature_group_count=feature_group_count
        )
    strides = _pair(strides)
    pads = explicit_padding(x.shape, kernel.shape, strides, padding)
    static = all(isinstance(d, int) for d in (*x.shape, *kernel.shape))  # not symbolic (jax2tf)
    # Several processes each measuring would pick paths on their own timings, and processes that
    # compile different programs pair their collectives wrongly: every process takes the rules.
    measure = cpu_conv_mode() == "measure" and jax.process_count() == 1
    if measure and static and min(p for pair in pads for p in pair) >= 0:
        if tuple(kernel.shape[:2]) == (1, 1):
            if measured_choice(x, kernel, strides, pads)["conv"] == "matmul":
                return conv1x1_as_matmul(x, kernel, strides=strides, padding=pads)
            return xla_conv2d(x, kernel, strides=strides, padding=pads)
        # The backward methods are chosen when (and only if) the layer is differentiated.
        return _conv_custom_vjp(x, kernel, strides, pads, "measure", "measure")
    forward, dx_method, dw_method = cpu_plan(x.shape, kernel.shape, strides, pads)
    if forward == "matmul":
        return conv1x1_as_matmul(x, kernel, strides=strides, padding=pads)
    return conv2d_with_backward(
        x, kernel, strides=strides, padding=pads, dx_method=dx_method, dw_method=dw_method
    )


def measured_layer(x, kernel, strides, pads):
    """The `conv_autotune.Layer` of a conv: its batch divided by the device count when it splits
    (a sharded step gives each device that share of the work)."""
    from simclrv2_jax.models.conv_autotune import Layer

    n = x.shape[0] // batch_groups(x.shape[0])
    return Layer(
        x_shape=(n, *map(int, x.shape[1:])),
        kernel_shape=tuple(map(int, kernel.shape)),
        strides=tuple(strides),
        pads=tuple(tuple(p) for p in pads),
        dtype=str(jnp.result_type(x, kernel)),
    )


def measured_choice(x, kernel, strides, pads) -> dict[str, str]:
    """``{direction: method}`` for this layer, measured on this machine (or recalled)."""
    from simclrv2_jax.models import conv_autotune

    layer = measured_layer(x, kernel, strides, pads)
    return conv_autotune.tuner(_measure, _rules).choose(layer)


def _rules(layer) -> dict[str, str]:
    """The fixed rules (`cpu_plan`) for a layer, as the autotuner stores choices."""
    forward, dx, dw = cpu_plan(layer.x_shape, layer.kernel_shape, layer.strides, layer.pads)
    if forward == "matmul":
        return {"conv": "matmul"}
    return {"dx": dx, "dw": dw}


def _measure(layer, direction: str, method: str) -> float:
    """Seconds of one candidate for ``layer`` on concrete random data (outside any trace)."""
    from simclrv2_jax.models import conv_autotune

    def run() -> float:
        import numpy as np

        rng = np.random.default_rng(0)
        dtype = jnp.dtype(layer.dtype)
        kh, kw, cin, _ = layer.kernel_shape
        x = jnp.asarray(rng.standard_normal(layer.x_shape), dtype)
        kernel = jnp.asarray(rng.standard_normal(layer.kernel_shape) / np.sqrt(kh * kw * cin), dtype)
        strides, pads = layer.strides, layer.pads

        def xla(x_, k_):
            return xla_conv2d(x_, k_, strides=strides, padding=pads)

        g = jnp.asarray(rng.standard_normal(jax.eval_shape(xla, x, kernel).shape), dtype)
        if direction == "conv":
            conv = xla if method == "xla" else partial(conv1x1_as_matmul, strides=strides, padding=pads)
            fn = jax.jit(lambda x_, k_, g_: jax.vjp(conv, x_, k_)[1](g_))  # forward and both gradients
        elif direction == "dx":
            if method == "xla":
                fn = jax.jit(lambda x_, k_, g_: jax.vjp(lambda a: xla(a, k_), x_)[1](g_)[0])
            else:
                fn = jax.jit(lambda x_, k_, g_: _input_grad_subpixel(g_, k_, x_.shape, strides, pads))
        elif method == "xla":
            fn = jax.jit(lambda x_, k_, g_: jax.vjp(lambda b: xla(x_, b), k_)[1](g_)[0])
        else:
            fn = jax.jit(lambda x_, k_, g_: _weight_grad_taps(x_, g_, k_.shape, strides, pads))
        return conv_autotune.time_call(lambda: fn(x, kernel, g), jax.block_until_ready)

    return conv_autotune.run_outside_trace(run)


def cpu_plan(x_shape, kernel_shape, strides, padding: Padding) -> tuple[str, str, str]:
    """(forward, input-gradient, weight-gradient) methods `conv2d` uses for a layer on the CPU.

    From measurements on 2-core CPU machines (``benchmarks/results/conv_cpu.json``):
    * 1x1: one matmul, forward too; its autodiff is the two gradient matmuls.
    * kxk dw: "taps" once the layer is big -- N*Ho*Wo*min(Cin, Cout) >= 2**23 with both channel
      counts >= 32 -- where XLA's weight gradient slows down most; for strided convs also from 128
      channels up. Smaller layers keep XLA's, which is as fast or faster there.
    * kxk dx: XLA's, except "subpixel" for strided convs with Cin <= 32 on images of >= 24x24.
    """
    strides = _pair(strides)
    pads = explicit_padding(x_shape, kernel_shape, strides, padding)
    n, h, w, _ = x_shape
    kh, kw, cin, cout = kernel_shape
    if min(p for pair in pads for p in pair) < 0:  # negative padding crops: leave it to XLA
        return "xla", "xla", "xla"
    if (kh, kw) == (1, 1):
        return "matmul", "matmul", "matmul"
    ho = (h + sum(pads[0]) - kh) // strides[0] + 1
    wo = (w + sum(pads[1]) - kw) // strides[1] + 1
    narrow = min(cin, cout)
    big = narrow >= _TAPS_MIN_CHANNELS and n * ho * wo * narrow >= _TAPS_MIN_SIZE
    strided = strides != (1, 1)
    taps = big or (strided and narrow >= _TAPS_MIN_CHANNELS_STRIDED) or os.environ.get(ENV_VAR, "1") == "taps"
    subpixel = strided and cin <= _SUBPIXEL_MAX_CIN and h * w >= _SUBPIXEL_MIN_PIXELS
    return "xla", ("subpixel" if subpixel else "xla"), ("taps" if taps else "xla")


# Thresholds of `cpu_plan`.
_TAPS_MIN_CHANNELS = 32
_TAPS_MIN_SIZE = 2**23  # N*Ho*Wo*min(Cin, Cout): 32 MiB of f32 activations
_TAPS_MIN_CHANNELS_STRIDED = 128
_SUBPIXEL_MAX_CIN = 32
_SUBPIXEL_MIN_PIXELS = 24 * 24


def conv2d_with_backward(
    x, kernel, *, strides=(1, 1), padding: Padding = "SAME", dx_method: str = "xla", dw_method: str = "xla"
):
    """XLA's forward conv with explicitly chosen backward methods (for tests and benchmarks)."""
    if dx_method not in DX_METHODS or dw_method not in DW_METHODS:
        raise ValueError(
            f"unknown backward method dx={dx_method!r} dw={dw_method!r}; "
            f"choose dx from {DX_METHODS} and dw from {DW_METHODS}"
        )
    strides = _pair(strides)
    pads = explicit_padding(x.shape, kernel.shape, strides, padding)
    if (
        (dx_method, dw_method) == ("xla", "xla")
        or not _supported(x, kernel)
        or min(p for pair in pads for p in pair) < 0
    ):
        return xla_conv2d(x, kernel, strides=strides, padding=pads)
    return _conv_custom_vjp(x, kernel, strides, pads, dx_method, dw_method)


def conv1x1_as_matmul(x, kernel, *, strides=(1, 1), padding: Padding = "VALID"):
    """A 1x1 conv as (strided slice of x) @ W; JAX's autodiff of it is fast in both directions."""
    strides = _pair(strides)
    pads = explicit_padding(x.shape, kernel.shape, strides, padding)
    if any(p for pair in pads for p in pair):
        x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    if strides != (1, 1):
        x = x[:, :: strides[0], :: strides[1], :]
    n, h, w, cin = x.shape
    cout = kernel.shape[3]
    y = lax.dot_general(
        x.reshape(n * h * w, cin),
        kernel.reshape(cin, cout),
        (((1,), (0,)), ((), ())),
        preferred_element_type=_accumulation_dtype(x, kernel),
    )
    return y.reshape(n, h, w, cout).astype(jnp.result_type(x, kernel))


def explicit_padding(x_shape, kernel_shape, strides, padding: Padding) -> tuple:
    """((top, bottom), (left, right)) for 'SAME'/'VALID', an int, or explicit pairs."""
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(x_shape[1:3], kernel_shape[:2], _pair(strides), padding)
    elif isinstance(padding, int):
        pads = [(padding, padding)] * 2
    else:
        pads = list(padding)
        if len(pads) != 2:
            raise ValueError(f"padding must give (lo, hi) pairs for 2 spatial dims, got {padding!r}")
    return tuple((int(lo), int(hi)) for lo, hi in pads)


def _supported(x, kernel) -> bool:
    return (
        x.ndim == 4
        and kernel.ndim == 4
        and x.shape[3] == kernel.shape[2]
        and jnp.issubdtype(jnp.result_type(x, kernel), jnp.floating)
    )


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_custom_vjp(x, kernel, strides, pads, dx_method, dw_method):
    return xla_conv2d(x, kernel, strides=strides, padding=pads)


def _conv_fwd(x, kernel, strides, pads, dx_method, dw_method):
    return xla_conv2d(x, kernel, strides=strides, padding=pads), (x, kernel)


def _conv_bwd(strides, pads, dx_method, dw_method, residuals, g):
    x, kernel = residuals
    if "measure" in (dx_method, dw_method):
        choice = measured_choice(x, kernel, strides, pads)
        dx_method, dw_method = choice["dx"], choice["dw"]
    if dx_method == "xla":
        dx = jax.vjp(lambda x_: xla_conv2d(x_, kernel, strides=strides, padding=pads), x)[1](g)[0]
    else:
        dx = _input_grad_subpixel(g, kernel, x.shape, strides, pads)
    if dw_method == "xla":
        dw = jax.vjp(lambda k_: xla_conv2d(x, k_, strides=strides, padding=pads), kernel)[1](g)[0]
    else:
        dw = _weight_grad_taps(x, g, kernel.shape, strides, pads)
    return dx.astype(x.dtype), dw.astype(kernel.dtype)


_conv_custom_vjp.defvjp(_conv_fwd, _conv_bwd)


def _accumulation_dtype(*arrays):
    dtype = jnp.result_type(*arrays)
    return jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype


def batch_groups(n: int) -> int:
    """How many independent slices the batch of a sharded step holds: one per device when the
    batch splits evenly over them (each device's examples are then one slice), else 1."""
    devices = jax.device_count()
    return devices if devices > 1 and n % devices == 0 else 1


def _weight_grad_taps(x, g, kernel_shape, strides, pads):
    """dW[i, j] = sum over n, h, w of xpad[n, s*h+i, s*w+j, :]^T g[n, h, w, :]: a matmul per tap.

    A loop over the taps rather than unrolled slices: as fast, and XLA keeps one shifted copy of
    the input alive instead of all kh*kw of them (148 -> 36 MB temporaries at 128ch 16x16 b128).

    The loop never sums over the batch. When the batch is split over devices, a sum over it inside
    the loop would be a cross-device reduction per tap, and XLA's CPU runtime does not order a
    collective inside a loop against the step's other collectives: devices that start them in
    different orders wait for each other forever (seen as a rendezvous abort with 8 virtual
    devices). So the batch is cut into ``batch_groups`` slices (one per device), each tap is a
    batched matmul over the slices, and the slices are summed once after the loop.
    """
    kh, kw, cin, cout = kernel_shape
    n, ho, wo, _ = g.shape
    sh, sw = strides
    groups = batch_groups(n)
    rows = n // groups * ho * wo
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    g3 = g.reshape(groups, rows, cout)
    acc = _accumulation_dtype(x, g)

    def tap(t, dw):
        window = lax.dynamic_slice(
            xp, (0, t // kw, t % kw, 0), (n, sh * (ho - 1) + 1, sw * (wo - 1) + 1, cin)
        )
        if (sh, sw) != (1, 1):
            window = window[:, ::sh, ::sw, :]
        # Contracting the rows (N*Ho*Wo) of both operands measured fastest here.
        d = lax.dot_general(
            window.reshape(groups, rows, cin), g3, (((1,), (1,)), ((0,), (0,))), preferred_element_type=acc
        )
        return lax.dynamic_update_index_in_dim(dw, d, t, 1)

    dw = lax.fori_loop(0, kh * kw, tap, jnp.zeros((groups, kh * kw, cin, cout), acc))
    return dw.sum(axis=0).reshape(kh, kw, cin, cout)


def _input_grad_subpixel(g, kernel, x_shape, strides, pads):
    """Input gradient of a strided conv as one stride-1 conv plus a depth-to-space reshape.

    With stride s, padded-input row s*q + a receives g[q - t] W[a + s*t] for every t: a full
    correlation of g with the phase-a sub-kernel. Stacking all s*s phases as output channels
    (sub-kernels zero-padded to ceil(k/s) taps) gives one dense conv, with no zero-dilated input.
    """
    n, h, w, cin = x_shape
    kh, kw, _, cout = kernel.shape
    sh, sw = strides
    th, tw = -(-kh // sh), -(-kw // sw)
    kp = jnp.pad(kernel, ((0, th * sh - kh), (0, tw * sw - kw), (0, 0), (0, 0)))
    sub = kp.reshape(th, sh, tw, sw, cin, cout)[::-1, :, ::-1]  # [t, a, u, b, ci, co], t/u flipped
    sub = jnp.transpose(sub, (0, 2, 5, 1, 3, 4)).reshape(th, tw, cout, sh * sw * cin)
    out = lax.conv_general_dilated(
        g,
        sub,
        (1, 1),
        ((th - 1, th - 1), (tw - 1, tw - 1)),
        dimension_numbers=DIMENSION_NUMBERS,
        preferred_element_type=_accumulation_dtype(g, kernel),
    )
    q, r = out.shape[1:3]
    out = out.reshape(n, q, r, sh, sw, cin).transpose(0, 1, 3, 2, 4, 5)
    out = out.reshape(n, q * sh, r * sw, cin)  # depth-to-space
    (top, bottom), (left, right) = pads
    hp, wp = h + top + bottom, w + left + right
    out = jnp.pad(out, ((0, 0), (0, max(hp - q * sh, 0)), (0, max(wp - r * sw, 0)), (0, 0)))
    return out[:, top : top + h, left : left + w].astype(g.dtype)


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(e) for e in v)
    if len(v) != 2:
        raise ValueError(f"expected 2 spatial values, got {v!r}")
    return v


def _lax_padding(padding: Padding):
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        return [(padding, padding)] * 2
    return [tuple(p) for p in padding]
