"""2-D convolution whose backward pass is fast on the CPU backend.

XLA's CPU convolutions are uneven across the three convolutions a training step runs. On these
2-core machines (JAX 0.10.2; see `benchmarks/conv_cpu.py` and its JSON for the numbers) the forward
and, for stride 1, the input gradient of a 3x3 conv run near the matmul ceiling, but:

* the weight gradient of a 1x1 conv is 3-5x slower than the single matmul it is
  (64->256, 7x7, batch 256: ~50 GFLOP/s in XLA, ~220 as one matmul);
* the weight gradient of a wide 3x3 conv (128->128, 16x16, batch 128) reaches ~65-110 GFLOP/s,
  while a sum over the nine kernel taps of `(N*Ho*Wo, Cin)^T @ (N*Ho*Wo, Cout)` matmuls on
  shifted slices of the padded input reaches ~115-130;
* the input gradient of a stride-2 3x3 conv with few output channels (32->64, 28x28) runs at
  ~45 GFLOP/s, a third of its forward, because XLA convolves a zero-dilated gradient. Splitting
  the kernel into its stride-phase sub-kernels ("sub-pixel" form) makes it one dense stride-1
  conv with `s*s*Cin` output channels followed by a depth-to-space reshape: ~110 GFLOP/s.

Narrow 3x3 convs (16-64 channels) are the opposite: XLA's own weight gradient is far better than
tap matmuls, whose tiny `Cin x Cout` outputs over a huge contraction run at ~10-30 GFLOP/s.

So `conv2d` keeps XLA's forward everywhere and, on the CPU backend, wraps it in a `jax.custom_vjp`
whose backward picks, per layer shape at trace time, XLA's gradient or one of the forms above
(`_plan`). On GPU/TPU, with `SIMCLR_FAST_CPU_CONV=0`, or with grouped convolutions it is exactly
`lax.conv_general_dilated`. The custom VJP supports `jit`, `grad` (also grad of grad) and
`jax.checkpoint`; forward-mode AD (`jvp`, `jacfwd`) is not defined for it: set the environment
variable to 0 for that.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
ENV_VAR = "SIMCLR_FAST_CPU_CONV"

Padding = Union[str, int, Sequence[tuple[int, int]]]

# Backward methods: for the input gradient (dx) and the weight gradient (dw).
DX_METHODS = ("xla", "subpixel")
DW_METHODS = ("xla", "taps")


def xla_conv2d(x, kernel, *, strides=(1, 1), padding: Padding = "SAME", feature_group_count=1):
    """Plain `lax.conv_general_dilated` with NHWC inputs and HWIO kernels."""
    return lax.conv_general_dilated(
        x, kernel, window_strides=_pair(strides), padding=_lax_padding(padding),
        dimension_numbers=DIMENSION_NUMBERS, feature_group_count=feature_group_count)


def fast_cpu_conv_enabled() -> bool:
    """Whether `conv2d` takes the CPU paths (decided when a function is traced).

    `SIMCLR_FAST_CPU_CONV=0` turns them off; `=taps` also computes the weight gradient of every
    kxk conv with tap matmuls, for CPUs where XLA's own weight gradient is the slow part.
    """
    return jax.default_backend() == "cpu" and os.environ.get(ENV_VAR, "1") != "0"


def conv2d(x, kernel, *, strides=(1, 1), padding: Padding = "SAME", feature_group_count=1):
    """NHWC x HWIO convolution; same result and gradients as `xla_conv2d`, faster on the CPU."""
    if feature_group_count != 1 or not fast_cpu_conv_enabled() or not _supported(x, kernel):
        return xla_conv2d(x, kernel, strides=strides, padding=padding,
                          feature_group_count=feature_group_count)
    strides = _pair(strides)
    pads = explicit_padding(x.shape, kernel.shape, strides, padding)
    forward, dx_method, dw_method = cpu_plan(x.shape, kernel.shape, strides, pads)
    if forward == "matmul":
        return conv1x1_as_matmul(x, kernel, strides=strides, padding=pads)
    return conv2d_with_backward(x, kernel, strides=strides, padding=pads,
                                dx_method=dx_method, dw_method=dw_method)


def cpu_plan(x_shape, kernel_shape, strides, padding: Padding) -> tuple[str, str, str]:
    """(forward, input-gradient, weight-gradient) methods `conv2d` uses for a layer on the CPU.

    From measurements on the 2-core CPU machines (module docstring; reproduce with
    `python -m benchmarks.conv_cpu --sweep --extra`):
    * 1x1: one matmul, forward too; its autodiff is the two gradient matmuls.
    * kxk, stride 1: XLA's own convolutions; tap matmuls did not beat XLA's weight gradient at
      16-512 channels, and XLA's input gradient is as fast as its forward.
    * kxk, strided: XLA convolves a zero-dilated gradient for dx, slow with few input channels on
      large images ("subpixel" instead); its dw lags tap matmuls once both channel counts reach 128.
    """
    strides = _pair(strides)
    pads = explicit_padding(x_shape, kernel_shape, strides, padding)
    _, h, w, _ = x_shape
    kh, kw, cin, cout = kernel_shape
    if min(p for pair in pads for p in pair) < 0:  # negative padding crops: leave it to XLA
        return "xla", "xla", "xla"
    if (kh, kw) == (1, 1):
        return "matmul", "matmul", "matmul"
    always_taps = os.environ.get(ENV_VAR, "1") == "taps"
    dw = "taps" if always_taps or min(cin, cout) >= _TAPS_MIN_CHANNELS else "xla"
    if strides == (1, 1):
        return "xla", "xla", ("taps" if always_taps else "xla")
    dx = "subpixel" if cin <= _SUBPIXEL_MAX_CIN and h * w >= _SUBPIXEL_MIN_PIXELS else "xla"
    return "xla", dx, dw


# Thresholds of `cpu_plan`.
_SUBPIXEL_MAX_CIN = 32
_SUBPIXEL_MIN_PIXELS = 24 * 24
_TAPS_MIN_CHANNELS = 128


def conv2d_with_backward(x, kernel, *, strides=(1, 1), padding: Padding = "SAME",
                         dx_method: str = "xla", dw_method: str = "xla"):
    """XLA's forward conv with explicitly chosen backward methods (for tests and benchmarks)."""
    if dx_method not in DX_METHODS or dw_method not in DW_METHODS:
        raise ValueError(f"unknown backward method dx={dx_method!r} dw={dw_method!r}; "
                         f"choose dx from {DX_METHODS} and dw from {DW_METHODS}")
    strides = _pair(strides)
    pads = explicit_padding(x.shape, kernel.shape, strides, padding)
    if (dx_method, dw_method) == ("xla", "xla") or not _supported(x, kernel) or min(
            p for pair in pads for p in pair) < 0:
        return xla_conv2d(x, kernel, strides=strides, padding=pads)
    return _conv_custom_vjp(x, kernel, strides, pads, dx_method, dw_method)


def conv1x1_as_matmul(x, kernel, *, strides=(1, 1), padding: Padding = "VALID"):
    """A 1x1 conv as (strided slice of x) @ W; JAX's own autodiff of it is fast in both directions."""
    strides = _pair(strides)
    pads = explicit_padding(x.shape, kernel.shape, strides, padding)
    if any(p for pair in pads for p in pair):
        x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    if strides != (1, 1):
        x = x[:, ::strides[0], ::strides[1], :]
    n, h, w, cin = x.shape
    cout = kernel.shape[3]
    y = lax.dot_general(x.reshape(n * h * w, cin), kernel.reshape(cin, cout),
                        (((1,), (0,)), ((), ())),
                        preferred_element_type=_accumulation_dtype(x, kernel))
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
    return (x.ndim == 4 and kernel.ndim == 4 and x.shape[3] == kernel.shape[2]
            and jnp.issubdtype(jnp.result_type(x, kernel), jnp.floating))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_custom_vjp(x, kernel, strides, pads, dx_method, dw_method):
    return xla_conv2d(x, kernel, strides=strides, padding=pads)


def _conv_fwd(x, kernel, strides, pads, dx_method, dw_method):
    return xla_conv2d(x, kernel, strides=strides, padding=pads), (x, kernel)


def _conv_bwd(strides, pads, dx_method, dw_method, residuals, g):
    x, kernel = residuals
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


def _weight_grad_taps(x, g, kernel_shape, strides, pads):
    """dW[i, j] = sum over (n, h, w) of xpad[n, s*h + i, s*w + j, :]^T g[n, h, w, :]: one matmul per tap.

    A loop over the taps rather than unrolled slices: as fast, and XLA keeps one shifted copy of
    the input alive instead of all kh*kw of them (148 -> 36 MB temporaries at 128ch 16x16 b128).
    """
    kh, kw, cin, cout = kernel_shape
    n, ho, wo, _ = g.shape
    sh, sw = strides
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    g2 = g.reshape(n * ho * wo, cout)
    acc = _accumulation_dtype(x, g)

    def tap(t, dw):
        window = lax.dynamic_slice(xp, (0, t // kw, t % kw, 0),
                                   (n, sh * (ho - 1) + 1, sw * (wo - 1) + 1, cin))
        if (sh, sw) != (1, 1):
            window = window[:, ::sh, ::sw, :]
        # Contracting the leading (N*Ho*Wo) dim of both operands measured fastest here.
        d = lax.dot_general(window.reshape(n * ho * wo, cin), g2, (((0,), (0,)), ((), ())),
                            preferred_element_type=acc)
        return lax.dynamic_update_index_in_dim(dw, d, t, 0)

    dw = lax.fori_loop(0, kh * kw, tap, jnp.zeros((kh * kw, cin, cout), acc))
    return dw.reshape(kh, kw, cin, cout)


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
    sub = kp.reshape(th, sh, tw, sw, cin, cout)[::-1, :, ::-1]        # [t, a, u, b, cin, cout], t/u flipped
    sub = jnp.transpose(sub, (0, 2, 5, 1, 3, 4)).reshape(th, tw, cout, sh * sw * cin)
    out = lax.conv_general_dilated(g, sub, (1, 1), ((th - 1, th - 1), (tw - 1, tw - 1)),
                                   dimension_numbers=DIMENSION_NUMBERS,
                                   preferred_element_type=_accumulation_dtype(g, kernel))
    q, r = out.shape[1:3]
    out = out.reshape(n, q, r, sh, sw, cin).transpose(0, 1, 3, 2, 4, 5).reshape(n, q * sh, r * sw, cin)
    (top, bottom), (left, right) = pads
    hp, wp = h + top + bottom, w + left + right
    out = jnp.pad(out, ((0, 0), (0, max(hp - q * sh, 0)), (0, max(wp - r * sw, 0)), (0, 0)))
    return out[:, top:top + h, left:left + w].astype(g.dtype)


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
