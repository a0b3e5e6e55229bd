"""conv2d: values and gradients equal XLA's convolution for every backward method."""

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from simclrv2_jax.models import conv as conv_lib

DN = ("NHWC", "HWIO", "NHWC")

# kernel, stride, padding, spatial (h, w), batch, cin, cout
CASES = [
    (3, 1, "SAME", (9, 9), 3, 4, 6),
    (3, 1, "VALID", (7, 7), 1, 5, 3),
    (3, 2, ((1, 1), (1, 1)), (9, 9), 3, 4, 6),
    (3, 2, ((0, 1), (0, 1)), (7, 7), 1, 3, 5),
    (3, 2, "SAME", (8, 7), 3, 4, 4),
    (3, 2, "VALID", (9, 9), 1, 4, 6),
    (3, 1, ((2, 0), (1, 3)), (7, 9), 3, 4, 5),
    (1, 1, "SAME", (7, 7), 3, 6, 4),
    (1, 2, "VALID", (9, 9), 3, 4, 8),
    (1, 2, ((0, 1), (0, 1)), (7, 7), 1, 5, 3),
    (7, 2, ((3, 3), (3, 3)), (9, 9), 3, 3, 8),
    (7, 1, "SAME", (7, 7), 1, 4, 4),
    (7, 2, "VALID", (9, 9), 1, 3, 4),
]


def _ids(case):
    k, s, pad, hw, n, cin, cout = case
    return f"k{k}-s{s}-{pad}-{hw[0]}x{hw[1]}-b{n}-{cin}to{cout}"


def _method_pairs():
    return list(itertools.product(conv_lib.DX_METHODS, conv_lib.DW_METHODS))


def _inputs(case, dtype=jnp.float32, seed=0):
    k, s, pad, (h, w), n, cin, cout = case
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, h, w, cin)), dtype)
    kernel = jnp.asarray(rng.normal(size=(k, k, cin, cout)) / k, dtype)
    return x, kernel


def _loss(conv):
    # A non-linear readout so the incoming gradient is not uniform.
    return lambda x, kernel: jnp.sum(jnp.sin(conv(x, kernel)))


def _assert_close(actual, expected, tol):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_gradients_match_xla_for_every_backward(case):
    k, s, pad, *_ = case
    x, kernel = _inputs(case)
    reference = jax.grad(
        _loss(lambda a, b: lax.conv_general_dilated(a, b, (s, s), pad, dimension_numbers=DN)), argnums=(0, 1)
    )(x, kernel)

    pairs = _method_pairs()

    @jax.jit
    def all_grads(x, kernel):
        out = [
            jax.grad(_loss(lambda a, b: conv_lib.conv2d(a, b, strides=(s, s), padding=pad)), argnums=(0, 1))(
                x, kernel
            )
        ]
        for dx_m, dw_m in pairs:
            conv = lambda a, b, dx_m=dx_m, dw_m=dw_m: conv_lib.conv2d_with_backward(
                a, b, strides=(s, s), padding=pad, dx_method=dx_m, dw_method=dw_m
            )
            out.append(jax.grad(_loss(conv), argnums=(0, 1))(x, kernel))
        return out

    for name, (dx, dw) in zip(["conv2d"] + [f"{a}/{b}" for a, b in pairs], all_grads(x, kernel)):
        assert dx.dtype == x.dtype and dw.dtype == kernel.dtype, name
        _assert_close(dx, reference[0], 1e-5)
        _assert_close(dw, reference[1], 1e-5)


def test_weight_gradient_matches_numpy_loops():
    # Independent reference: dW[i, j] = sum over n, h, w of xpad[n, 2h+i, 2w+j]^T g[n, h, w].
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 7, 7, 3)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
    g = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)  # (7 + 1 - 3) // 2 + 1 = 3
    xp = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    expected = np.zeros_like(kernel)
    for i, j in itertools.product(range(3), range(3)):
        patch = xp[:, i : i + 5 : 2, j : j + 5 : 2, :]
        expected[i, j] = np.einsum("nhwc,nhwo->co", patch, g)
    conv = lambda k_: conv_lib.conv2d_with_backward(
        jnp.asarray(x), k_, strides=(2, 2), padding=((0, 1), (0, 1)), dx_method="subpixel", dw_method="taps"
    )
    _, pullback = jax.vjp(conv, jnp.asarray(kernel))
    np.testing.assert_allclose(pullback(jnp.asarray(g))[0], expected, rtol=1e-5, atol=1e-5)


def _loop_bodies(hlo: str) -> list[str]:
    """The text of every computation that is the body or condition of a while loop in ``hlo``."""
    names = set(re.findall(r"(?:body|condition)=%?([\w.\-]+)", hlo))
    computations = re.finditer(r"^(?:ENTRY )?%?([\w.\-]+) \(.*?\{\n(.*?)\n\}", hlo, re.M | re.S)
    return [m.group(2) for m in computations if m.group(1) in names]


def test_taps_weight_gradient_over_sharded_batch_has_no_collective_in_its_loop():
    """With the batch split over 8 devices, the taps weight gradient equals the NumPy sum over the
    whole batch, and the only cross-device sum is outside the loop over taps: a collective inside a
    loop is not ordered against the step's other collectives by XLA's CPU runtime, and devices that
    start them in different orders deadlock (a rendezvous abort)."""
    assert jax.device_count() == 8, "conftest sets 8 virtual CPU devices"
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rng = np.random.default_rng(2)
    x = rng.normal(size=(16, 6, 6, 3)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 3, 5)).astype(np.float32)
    g = rng.normal(size=(16, 6, 6, 5)).astype(np.float32)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    expected = np.zeros_like(kernel)
    for i, j in itertools.product(range(3), range(3)):
        expected[i, j] = np.einsum("nhwc,nhwo->co", xp[:, i : i + 6, j : j + 6, :], g)

    def weight_grad(x_, k_, g_):
        conv = lambda k2: conv_lib.conv2d_with_backward(x_, k2, padding="SAME", dw_method="taps")
        return jax.vjp(conv, k_)[1](g_)[0]

    fn = jax.jit(weight_grad, in_shardings=(batch, rep, batch), out_shardings=rep)
    args = (jax.device_put(x, batch), jax.device_put(kernel, rep), jax.device_put(g, batch))
    np.testing.assert_allclose(fn(*args), expected, rtol=1e-4, atol=1e-4)
    hlo = fn.lower(*args).compile().as_text()
    bodies = _loop_bodies(hlo)
    assert bodies, "the taps are a loop"
    collectives = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
    assert not [b for b in bodies if any(c in b for c in collectives)]
    assert "all-reduce" in hlo  # the batch sum across devices, once, after the loop


def test_dispatch_follows_backend_and_env_var(monkeypatch):
    def primitives(case, strides):
        x, kernel = _inputs(case)
        conv = lambda a, b: conv_lib.conv2d(a, b, strides=strides, padding="SAME")
        return str(jax.make_jaxpr(conv)(x, kernel))

    one_by_one = (1, 1, "SAME", (7, 7), 1, 8, 4)
    wide_strided = (3, 2, "SAME", (9, 9), 1, 128, 128)
    monkeypatch.delenv(conv_lib.ENV_VAR, raising=False)
    assert jax.default_backend() == "cpu" and conv_lib.fast_cpu_conv_enabled()
    assert conv_lib.cpu_conv_mode() == "measure"  # the default: see test_conv_autotune.py
    monkeypatch.setenv(conv_lib.ENV_VAR, "heuristic")  # the fixed rules
    assert conv_lib.cpu_plan((1, 7, 7, 8), (1, 1, 8, 4), (1, 1), "SAME") == ("matmul",) * 3
    assert conv_lib.cpu_plan((1, 9, 9, 8), (3, 3, 8, 8), (1, 1), "SAME") == ("xla",) * 3
    assert conv_lib.cpu_plan((1, 9, 9, 128), (3, 3, 128, 128), (2, 2), "SAME")[2] == "taps"
    assert conv_lib.cpu_plan((256, 16, 16, 128), (3, 3, 128, 128), (1, 1), "SAME")[2] == "taps"
    assert conv_lib.cpu_plan((256, 28, 28, 16), (3, 3, 16, 16), (1, 1), "SAME")[2] == "xla"
    jaxpr = primitives(one_by_one, (1, 1))
    assert "dot_general" in jaxpr and "conv_general_dilated" not in jaxpr
    assert "custom_vjp" in primitives(wide_strided, (2, 2))

    monkeypatch.setenv(conv_lib.ENV_VAR, "taps")
    assert conv_lib.cpu_plan((1, 9, 9, 8), (3, 3, 8, 8), (1, 1), "SAME") == ("xla", "xla", "taps")

    monkeypatch.setenv(conv_lib.ENV_VAR, "0")
    assert not conv_lib.fast_cpu_conv_enabled()
    jaxpr = primitives(one_by_one, (1, 1))
    assert "conv_general_dilated" in jaxpr and "dot_general" not in jaxpr
    assert "custom_vjp" not in primitives(wide_strided, (2, 2))


def test_grouped_convolution_falls_back_to_xla():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 7, 7, 4)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 2, 6)), jnp.float32)
    conv = lambda a, b: conv_lib.conv2d(a, b, padding="SAME", feature_group_count=2)
    assert "custom_vjp" not in str(jax.make_jaxpr(conv)(x, kernel))
    expected = lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=2
    )
    _assert_close(conv(x, kernel), expected, 1e-6)


@pytest.mark.parametrize(
    "case", [(3, 2, ((1, 1), (1, 1)), (9, 9), 3, 8, 8), (1, 2, "VALID", (9, 9), 3, 8, 8)], ids=_ids
)
def test_bfloat16_keeps_dtypes_and_matches_float32(case):
    k, s, pad, *_ = case
    x32, k32 = _inputs(case)
    x16, k16 = x32.astype(jnp.bfloat16), k32.astype(jnp.bfloat16)
    reference = jax.grad(
        _loss(lambda a, b: lax.conv_general_dilated(a, b, (s, s), pad, dimension_numbers=DN)), argnums=(0, 1)
    )(x16.astype(jnp.float32), k16.astype(jnp.float32))
    convs = [lambda a, b: conv_lib.conv2d(a, b, strides=(s, s), padding=pad)]
    for dx_m, dw_m in _method_pairs():
        convs.append(
            lambda a, b, dx_m=dx_m, dw_m=dw_m: conv_lib.conv2d_with_backward(
                a, b, strides=(s, s), padding=pad, dx_method=dx_m, dw_method=dw_m
            )
        )
    for conv in convs:
        y = jax.jit(conv)(x16, k16)
        dx, dw = jax.jit(jax.grad(_loss(conv), argnums=(0, 1)))(x16, k16)
        assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
        _assert_close(dx, reference[0], 3e-2)
        _assert_close(dw, reference[1], 3e-2)


def test_checkpoint_and_second_order_match_xla():
    case = (3, 2, ((0, 1), (0, 1)), (9, 9), 3, 4, 5)
    x, kernel = _inputs(case)

    def make(conv_fn):
        conv = lambda a, b: conv_fn(a, b, strides=(2, 2), padding=case[2])
        loss = _loss(jax.checkpoint(conv))

        def gradient_penalty(x, kernel):  # reverse-over-reverse through the custom VJP
            dx = jax.grad(loss)(x, kernel)
            return jnp.sum(dx**2)

        return jax.jit(
            lambda x, k: (
                conv(x, k),
                jax.grad(loss, argnums=(0, 1))(x, k),
                jax.grad(gradient_penalty, argnums=(0, 1))(x, k),
            )
        )

    fast = make(
        lambda a, b, **kw: conv_lib.conv2d_with_backward(a, b, dx_method="subpixel", dw_method="taps", **kw)
    )
    xla = make(conv_lib.xla_conv2d)
    for actual, expected in zip(jax.tree.leaves(fast(x, kernel)), jax.tree.leaves(xla(x, kernel))):
        _assert_close(actual, expected, 1e-5)


def test_explicit_padding_forms():
    assert conv_lib.explicit_padding((1, 7, 7, 3), (3, 3, 3, 4), (2, 2), "SAME") == ((1, 1), (1, 1))
    assert conv_lib.explicit_padding((1, 8, 8, 3), (3, 3, 3, 4), (2, 2), "SAME") == ((0, 1), (0, 1))
    assert conv_lib.explicit_padding((1, 8, 8, 3), (7, 7, 3, 4), 1, "VALID") == ((0, 0), (0, 0))
    assert conv_lib.explicit_padding((1, 8, 8, 3), (3, 3, 3, 4), 1, 2) == ((2, 2), (2, 2))
    with pytest.raises(ValueError, match="padding"):
        conv_lib.explicit_padding((1, 8, 8, 3), (3, 3, 3, 4), 1, [(1, 1)])
