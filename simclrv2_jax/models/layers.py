"""Building blocks shared by the backbone and the heads: convolution, batch norm, SK and SE.

Every layer follows the authors' public release so that hyperparameters and published checkpoints
carry over:

* Convolutions have no bias and a variance-scaling (fan_in, truncated normal) kernel init.
* Strided convolutions use *fixed padding* -- ``(k-1)//2`` before and the rest after -- then VALID,
  independent of the input size. Flax's ``'SAME'`` pads a strided conv depending on the input size,
  which shifts the sampling grid and breaks checkpoint compatibility, so it is used only at stride 1.
* Batch norm uses decay 0.9 and epsilon 1e-5 and can start with ``gamma = 0`` (last BN of a residual
  branch). With ``num_groups = 0`` statistics are taken over the whole (global) batch, as TF1's
  cross-replica BN (``global_bn``). With ``num_groups = k >= 1`` they are taken per group of
  consecutive rows, which, with the batch sharded over ``k`` devices of the ``data`` mesh axis, is
  exactly per-device batch norm (``global_bn=False``) without leaving ``jit``; as TF1's fused BN,
  the moving variance then averages the *unbiased* batch variance (``n / (n - 1)``, ``n`` the values
  per channel in a group), while the activations are normalised with the biased one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

BATCH_NORM_DECAY = 0.9
BATCH_NORM_EPSILON = 1e-5

conv_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
head_kernel_init = nn.initializers.normal(stddev=0.01)


def fixed_padding(kernel_size: int) -> tuple[int, int]:
    """Padding (before, after) that a stride>1 convolution of ``kernel_size`` gets."""
    pad_total = kernel_size - 1
    pad_beg = pad_total // 2
    return pad_beg, pad_total - pad_beg


class Conv(nn.Module):
    """Bias-free 2-D convolution with fixed padding for strides > 1 (NHWC, HWIO kernel)."""

    features: int
    kernel_size: int
    strides: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", conv_kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
        if self.strides > 1:
            pad = fixed_padding(k)
            padding: Any = (pad, pad)
        else:
            padding = "SAME"
        return lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=(self.strides, self.strides),
            padding=padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )


class BatchNorm(nn.Module):
    """Batch norm over all axes but the last, in float32, global or per group (see the module docstring).

    ``use_bias`` is the BN beta ("center"); the projection head's last layer has none.
    ``zero_init`` starts gamma at 0 so a residual branch begins as the identity.
    ``num_groups``: 0 = statistics of the whole batch (global BN, biased moving variance); k >= 1 =
    each of k equal slices of the batch with its own statistics (per-device BN; the moving
    statistics average the groups' means and unbiased variances).
    """

    use_bias: bool = True
    use_scale: bool = True
    zero_init: bool = False
    momentum: float = BATCH_NORM_DECAY
    epsilon: float = BATCH_NORM_EPSILON
    num_groups: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        xf = x.astype(jnp.float32)
        if train:
            groups = max(self.num_groups, 1)
            if x.shape[0] % groups:
                if not self.is_initializing():
                    raise ValueError(
                        f"A batch of {x.shape[0]} rows cannot be split into {groups} batch-norm groups "
                        "(one per device with global_bn=False)."
                    )
                groups = 1
            xg = xf.reshape((groups, x.shape[0] // groups) + x.shape[1:])
            axes = tuple(range(1, xg.ndim - 1))
            mean = jnp.mean(xg, axis=axes, keepdims=True)
            # Two-pass variance: the one-pass E[x^2]-E[x]^2 loses precision for large activations.
            var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
            y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
            if not self.is_initializing():
                batch_mean = jnp.mean(mean.reshape(groups, features), axis=0)
                batch_var = jnp.mean(var.reshape(groups, features), axis=0)
                if self.num_groups >= 1:
                    n = xg[0].size // features  # values per channel in one group
                    batch_var = batch_var * (n / max(n - 1, 1))
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * batch_mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * batch_var
        else:
            y = (xf - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
        if self.use_scale:
            init = nn.initializers.zeros if self.zero_init else nn.initializers.ones
            y = y * self.param("scale", init, (features,), jnp.float32)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        return y.astype(self.dtype)


class BNReLU(nn.Module):
    """Batch norm, optionally followed by ReLU (the release's ``BatchNormRelu``)."""

    relu: bool = True
    zero_init: bool = False
    use_bias: bool = True
    num_groups: int = 0
    momentum: float = BATCH_NORM_DECAY
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = BatchNorm(
            use_bias=self.use_bias,
            zero_init=self.zero_init,
            num_groups=self.num_groups,
            momentum=self.momentum,
            dtype=self.dtype,
            name="bn",
        )(x, train)
        return nn.relu(x) if self.relu else x


class SKConv(nn.Module):
    """Selective-kernel 3x3 convolution (SimCLRv2's "SK1").

    One 3x3 conv with 2F filters stands for two kernel streams; a squeeze of the streams' sum picks a
    softmax mixture of the two per channel.
    """

    features: int
    strides: int
    sk_ratio: float
    min_dim: int = 32
    num_groups: int = 0
    momentum: float = BATCH_NORM_DECAY
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = dict(num_groups=self.num_groups, momentum=self.momentum, dtype=self.dtype)
        x = Conv(2 * self.features, 3, self.strides, dtype=self.dtype, name="conv_0")(x)
        x = BNReLU(**bn, name="bn_0")(x, train)
        streams = jnp.stack(jnp.split(x, 2, axis=-1), axis=0)  # [2, N, H, W, F]
        global_features = jnp.mean(jnp.sum(streams, axis=0), axis=(1, 2), keepdims=True)
        mid = max(int(self.features * self.sk_ratio), self.min_dim)
        g = Conv(mid, 1, dtype=self.dtype, name="conv_1")(global_features)
        g = BNReLU(**bn, name="bn_1")(g, train)
        g = Conv(2 * self.features, 1, dtype=self.dtype, name="conv_2")(g)
        mixing = jax.nn.softmax(jnp.stack(jnp.split(g, 2, axis=-1), axis=0).astype(jnp.float32), axis=0)
        return jnp.sum(streams * mixing.astype(streams.dtype), axis=0)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation gate; the squeeze width follows the block's base filter count."""

    features: int
    se_ratio: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        reduced = max(1, int(self.features * self.se_ratio))
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.Conv(
            reduced, (1, 1), use_bias=True, kernel_init=conv_kernel_init, dtype=self.dtype, name="conv_reduce"
        )(s)
        s = nn.relu(s)
        s = nn.Conv(
            x.shape[-1],
            (1, 1),
            use_bias=True,
            kernel_init=conv_kernel_init,
            dtype=self.dtype,
            name="conv_expand",
        )(s)
        return x * jax.nn.sigmoid(s)


def dense_bn_layer(
    features: int | None,
    *,
    use_bn: bool,
    use_bias: bool,
    name: str,
    num_groups: int = 0,
    momentum: float = BATCH_NORM_DECAY,
    dtype: Any = jnp.float32,
) -> Callable[..., jax.Array]:
    """The release's ``LinearLayer``: dense (bias only without BN), then BN (beta iff use_bias)."""
    return _DenseBN(
        features=features,
        use_bn=use_bn,
        use_bias=use_bias,
        num_groups=num_groups,
        momentum=momentum,
        dtype=dtype,
        name=name,
    )


class _DenseBN(nn.Module):
    features: int | None
    use_bn: bool
    use_bias: bool
    num_groups: int = 0
    momentum: float = BATCH_NORM_DECAY
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features = self.features if self.features is not None else x.shape[-1]
        x = nn.Dense(
            features,
            use_bias=self.use_bias and not self.use_bn,
            kernel_init=head_kernel_init,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="dense",
        )(x)
        if self.use_bn:
            x = BatchNorm(
                use_bias=self.use_bias,
                num_groups=self.num_groups,
                momentum=self.momentum,
                dtype=self.dtype,
                name="bn",
            )(x, train)
        return x
