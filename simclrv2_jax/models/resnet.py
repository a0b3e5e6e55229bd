"""The (SK-)ResNet family of SimCLRv2: post-activation ResNets, optionally selective-kernel.

Depths 18/34 use basic blocks, 50/101/152/200 bottleneck blocks. ``width_multiplier`` scales every
channel count (fractional values such as 0.25 give small models for CPU work). ``sk_ratio > 0`` turns
on selective-kernel 3x3 convs in bottleneck blocks and the ResNet-D stem and shortcut, as in the
paper's "SK1" models. Basic blocks keep plain 3x3 convs (the release has no SK basic block) but do
take the ResNet-D shortcut when ``sk_ratio > 0``.

``block_counts`` gives other numbers of blocks per group than the named depths (e.g. ``(1, 1, 1, 1)``
for small test models); ``depth`` must then be the layer count ``3 * sum + 2`` (bottleneck) or
``2 * sum + 2`` (basic), which says the block kind. See ``block_layout``.

``scan_blocks`` runs each group's blocks after the first as one ``nn.scan`` loop with stacked
weights (``block_group{g}_scan``; ``models.block_stack`` converts to and from one entry per block).

``fine_tune_after_block = k`` (0 = stem, 1..4 = block groups) freezes the weights of everything up to
and including part k: its output is wrapped in ``stop_gradient`` (and the optimiser zeroes their
updates, ``optim.trainable_mask``). As in the TF1 release, whose fine-tuning only stops the gradient,
the frozen parts' batch norms still run in training mode for k in 0..3 -- they normalise with batch
statistics and update their moving statistics -- and only k = 4 (linear evaluation: the whole
backbone frozen) runs the backbone in inference mode, its BN statistics fixed. ``-1`` trains
everything.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from simclrv2_jax.models.layers import (
    BATCH_NORM_DECAY,
    BNReLU,
    Conv,
    SKConv,
    SqueezeExcite,
    fixed_padding,
)

BLOCK_SPECS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}


def block_layout(depth: int, block_counts: tuple[int, ...] | None = None) -> tuple[str, tuple[int, ...]]:
    """(block kind, blocks per group) of a ResNet: from ``BLOCK_SPECS``, or from explicit counts.

    With ``block_counts`` the depth is the usual weighted-layer count (stem conv + fc + 3 convs per
    bottleneck block or 2 per basic block: 50 = 3 * 16 + 2), so it fixes the block kind unambiguously.
    """
    if not block_counts:  # None or (): the standard counts of the depth
        if depth not in BLOCK_SPECS:
            raise ValueError(f"resnet_depth={depth} is not supported; use one of {sorted(BLOCK_SPECS)}.")
        return BLOCK_SPECS[depth]
    counts = tuple(int(c) for c in block_counts)
    if len(counts) != 4 or min(counts) < 1:
        raise ValueError(f"block_counts={block_counts} must be four positive numbers of blocks per group.")
    if depth == 3 * sum(counts) + 2:
        return "bottleneck", counts
    if depth == 2 * sum(counts) + 2:
        return "basic", counts
    raise ValueError(
        f"resnet_depth={depth} does not fit block_counts={counts}: use {3 * sum(counts) + 2} for bottleneck "
        f"blocks or {2 * sum(counts) + 2} for basic blocks."
    )


def scaled_width(base: int, width_multiplier: float) -> int:
    """Channel count ``base * width_multiplier`` as an integer (at least 1)."""
    return max(1, int(base * width_multiplier))


class Shortcut(nn.Module):
    """Projection shortcut: 1x1/s conv + BN, or ResNet-D (avg-pool then 1x1/1 conv + BN) with SK."""

    features: int
    strides: int
    resnet_d: bool
    num_groups: int = 0
    momentum: float = BATCH_NORM_DECAY
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.resnet_d:
            if self.strides > 1:
                pad = fixed_padding(2)
                x = jnp.pad(x, ((0, 0), pad, pad, (0, 0)))
                x = nn.avg_pool(x, (2, 2), strides=(self.strides,) * 2, padding="VALID")
            else:
                # TF's SAME average pooling divides by the number of real (unpadded) inputs.
                x = nn.avg_pool(x, (2, 2), strides=(1, 1), padding="SAME", count_include_pad=False)
            x = Conv(self.features, 1, 1, dtype=self.dtype, name="conv")(x)
        else:
            x = Conv(self.features, 1, self.strides, dtype=self.dtype, name="conv")(x)
        return BNReLU(
            relu=False, num_groups=self.num_groups, momentum=self.momentum, dtype=self.dtype, name="bn"
        )(x, train)


class ResidualBlock(nn.Module):
    """The settings every residual block has; subclasses define the branch."""

    features: int
    strides: int
    use_projection: bool
    sk_ratio: float = 0.0
    se_ratio: float = 0.0
    num_groups: int = 0
    momentum: float = BATCH_NORM_DECAY
    dtype: Any = jnp.float32


class BasicBlock(ResidualBlock):
    """Two 3x3 convs; the last BN starts at gamma 0."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = dict(num_groups=self.num_groups, momentum=self.momentum, dtype=self.dtype)
        shortcut = x
        if self.use_projection:
            shortcut = Shortcut(self.features, self.strides, self.sk_ratio > 0, **bn, name="shortcut")(
                x, train
            )
        y = Conv(self.features, 3, self.strides, dtype=self.dtype, name="conv_0")(x)
        y = BNReLU(**bn, name="bn_0")(y, train)
        y = Conv(self.features, 3, 1, dtype=self.dtype, name="conv_1")(y)
        y = BNReLU(relu=False, zero_init=True, **bn, name="bn_1")(y, train)
        if self.se_ratio > 0:
            y = SqueezeExcite(self.features, self.se_ratio, dtype=self.dtype, name="se")(y)
        return nn.relu(y + shortcut)


class BottleneckBlock(ResidualBlock):
    """1x1 -> 3x3/s (or SK) -> 1x1 (4x filters); the last BN starts at gamma 0."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = dict(num_groups=self.num_groups, momentum=self.momentum, dtype=self.dtype)
        shortcut = x
        if self.use_projection:
            shortcut = Shortcut(4 * self.features, self.strides, self.sk_ratio > 0, **bn, name="shortcut")(
                x, train
            )
        y = Conv(self.features, 1, 1, dtype=self.dtype, name="conv_0")(x)
        y = BNReLU(**bn, name="bn_0")(y, train)
        if self.sk_ratio > 0:
            y = SKConv(self.features, self.strides, self.sk_ratio, **bn, name="sk_conv")(y, train)
        else:
            y = Conv(self.features, 3, self.strides, dtype=self.dtype, name="conv_1")(y)
            y = BNReLU(**bn, name="bn_1")(y, train)
        y = Conv(4 * self.features, 1, 1, dtype=self.dtype, name="conv_2")(y)
        y = BNReLU(relu=False, zero_init=True, **bn, name="bn_2")(y, train)
        if self.se_ratio > 0:
            y = SqueezeExcite(self.features, self.se_ratio, dtype=self.dtype, name="se")(y)
        return nn.relu(y + shortcut)


class Stem(nn.Module):
    """ImageNet stem (7x7/2 conv, max-pool), ResNet-D stem with SK, or the CIFAR stem (3x3/1).

    Returns ``(initial_conv, initial_max_pool)``; as in the release, ``initial_conv`` is the last
    stem conv's output before its batch norm and ReLU.
    """

    width_multiplier: float
    sk_ratio: float = 0.0
    cifar_stem: bool = False
    num_groups: int = 0
    momentum: float = BATCH_NORM_DECAY
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        bn = dict(num_groups=self.num_groups, momentum=self.momentum, dtype=self.dtype)
        width = scaled_width(64, self.width_multiplier)
        if self.cifar_stem:
            initial_conv = Conv(width, 3, 1, dtype=self.dtype, name="conv_0")(x)
            x = BNReLU(**bn, name="bn_0")(initial_conv, train)
            return initial_conv, x
        if self.sk_ratio > 0:
            x = Conv(width // 2, 3, 2, dtype=self.dtype, name="conv_0")(x)
            x = BNReLU(**bn, name="bn_0")(x, train)
            x = Conv(width // 2, 3, 1, dtype=self.dtype, name="conv_1")(x)
            x = BNReLU(**bn, name="bn_1")(x, train)
            initial_conv = Conv(width, 3, 1, dtype=self.dtype, name="conv_2")(x)
            x = BNReLU(**bn, name="bn_2")(initial_conv, train)
        else:
            initial_conv = Conv(width, 7, 2, dtype=self.dtype, name="conv_0")(x)
            x = BNReLU(**bn, name="bn_0")(initial_conv, train)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        return initial_conv, x


class _Repeated(nn.Module):
    """One residual block as the body of ``nn.scan``: the carry is the activation, no per-step input.

    ``train`` is an attribute rather than an argument, so it stays a Python bool (static) inside the
    scanned and rematerialised function.
    """

    block_cls: Any
    block_kwargs: dict
    train: bool

    @nn.compact
    def __call__(self, x: jax.Array, _: None) -> tuple[jax.Array, None]:
        return self.block_cls(**self.block_kwargs, name="block")(x, self.train), None


class ResNet(nn.Module):
    """Backbone returning ``(h, endpoints)``; ``h`` is the global-average-pooled feature."""

    depth: int = 50
    width_multiplier: float = 1.0
    sk_ratio: float = 0.0
    se_ratio: float = 0.0
    cifar_stem: bool = False
    block_counts: tuple[int, ...] | None = None  # None or (): the standard counts of ``depth``
    fine_tune_after_block: int = -1
    num_groups: int = 0
    momentum: float = BATCH_NORM_DECAY
    dtype: Any = jnp.float32
    # Recompute each residual block's activations in the backward pass instead of keeping them:
    # only the blocks' inputs stay in memory (same results, about a third more compute).
    remat: bool = False
    # Run each group's blocks after the first (all the same shape) as one ``nn.scan`` loop: their
    # weights are stacked along a new leading axis under ``block_group{g}_scan/block/...`` (see
    # ``models.block_stack``). XLA then compiles one block body per group instead of every block,
    # which cuts the compile time of the deep models several-fold (R152: 50 blocks -> 8 bodies).
    scan_blocks: bool = False
    # With scan_blocks under fsdp (set by ``ParamLayout.for_apply`` inside the train step): makes one
    # block's split weights whole inside the loop, so only one block's weights are whole at a time.
    gather_blocks: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        kind, counts = block_layout(self.depth, self.block_counts)
        block_cls = BasicBlock if kind == "basic" else BottleneckBlock
        if self.remat:
            block_cls = nn.remat(block_cls, static_argnums=(2,))  # (self, x, train): train is static
        bn = dict(num_groups=self.num_groups, momentum=self.momentum, dtype=self.dtype)

        def part_train(part: int) -> bool:
            # As the TF1 release: frozen parts still normalise with batch statistics and update their
            # moving statistics while fine-tuning (only their weights are frozen); linear evaluation
            # (everything frozen, k >= 4) runs the whole backbone in inference mode.
            return train and (part > self.fine_tune_after_block or self.fine_tune_after_block < 4)

        def maybe_freeze(part: int, y: jax.Array) -> jax.Array:
            return jax.lax.stop_gradient(y) if part <= self.fine_tune_after_block else y

        endpoints: dict[str, jax.Array] = {}
        x = x.astype(self.dtype)
        initial_conv, x = Stem(self.width_multiplier, self.sk_ratio, self.cifar_stem, **bn, name="stem")(
            x, part_train(0)
        )
        endpoints["initial_conv"] = initial_conv
        endpoints["initial_max_pool"] = x
        x = maybe_freeze(0, x)
        for group, (count, stride) in enumerate(zip(counts, (1, 2, 2, 2)), start=1):
            features = scaled_width(64 * 2 ** (group - 1), self.width_multiplier)
            settings = dict(sk_ratio=self.sk_ratio, se_ratio=self.se_ratio, **bn)
            scanned = self.scan_blocks and count > 1
            for i in range(1 if scanned else count):
                x = block_cls(
                    features,
                    stride if i == 0 else 1,
                    use_projection=(i == 0),
                    **settings,
                    name=f"block_group{group}_{i}",
                )(x, part_train(group))
            if scanned:
                body = _Repeated
                if self.gather_blocks is not None and not self.is_initializing():
                    body = nn.map_variables(body, "params", trans_in_fn=self.gather_blocks)
                if self.remat:
                    body = nn.remat(body, prevent_cse=False)  # inside a loop CSE cannot undo it
                repeated = nn.scan(
                    body,
                    variable_axes={"params": 0, "batch_stats": 0},
                    split_rngs={"params": True},
                    length=count - 1,
                )
                plain_cls = BasicBlock if kind == "basic" else BottleneckBlock
                x, _ = repeated(
                    plain_cls,
                    dict(features=features, strides=1, use_projection=False, **settings),
                    part_train(group),
                    name=f"block_group{group}_scan",
                )(x, None)
            endpoints[f"block_group{group}"] = x
            x = maybe_freeze(group, x)
        h = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        endpoints["final_avg_pool"] = h
        return h, endpoints
