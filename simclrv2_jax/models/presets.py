"""Named architectures: ``r{depth}_{width}x_sk{0,1}`` as in the paper, plus small CPU models.

A preset fixes only the architecture (``resnet_depth``, ``width_multiplier``, ``sk_ratio``); the stem
follows the image size (CIFAR stem for 32 px or less), so ``r18_0.25x`` on Fashion-MNIST gets the
CIFAR stem and ``r50_1x_sk0`` on ImageNet the 7x7 stem.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from simclrv2_jax.models.simclr import SimCLRModel

SK_RATIO = 0.0625  # the paper's "SK1"


def _paper_presets() -> dict[str, dict[str, Any]]:
    presets = {}
    for depth in (50, 101, 152, 200):
        for width in (1, 2, 3):
            for sk in (0, 1):
                presets[f"r{depth}_{width}x_sk{sk}"] = dict(
                    resnet_depth=depth, width_multiplier=float(width), sk_ratio=SK_RATIO * sk)
    return presets


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    **_paper_presets(),
    # Small models for CPU experiments and tests.
    "r18_cifar": dict(resnet_depth=18, width_multiplier=1.0, sk_ratio=0.0),
    "r18_1x": dict(resnet_depth=18, width_multiplier=1.0, sk_ratio=0.0),
    "r18_0.5x": dict(resnet_depth=18, width_multiplier=0.5, sk_ratio=0.0),
    "r18_0.25x": dict(resnet_depth=18, width_multiplier=0.25, sk_ratio=0.0),
    "r34_1x": dict(resnet_depth=34, width_multiplier=1.0, sk_ratio=0.0),
}


def model_preset(name: str) -> dict[str, Any]:
    if name not in MODEL_PRESETS:
        raise ValueError(f"Unknown model preset {name!r}. Known presets: {', '.join(sorted(MODEL_PRESETS))}.")
    return dict(MODEL_PRESETS[name])


def count_params(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))


def parameter_counts(model: SimCLRModel, image_size: int, channels: int = 3) -> dict[str, int]:
    """Parameter count per top-level part, from shapes only (``jax.eval_shape``, nothing allocated).

    Keys: ``backbone``, ``head_projection``, ``head_supervised``, ``total`` (trainable parameters) and
    ``<part>_bn_stats`` (BN moving mean/variance). The paper's Table 1 counts every variable of the
    backbone, BN statistics included: ``backbone + backbone_bn_stats`` rounds to its numbers for all
    thirteen models (e.g. R152-2x: 232.25M trainable + 0.32M statistics = 233M).
    """
    images = jax.ShapeDtypeStruct((2, image_size, image_size, channels), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    counts = {name: count_params(tree) for name, tree in variables["params"].items()}
    counts["total"] = sum(counts.values())
    for name, tree in variables.get("batch_stats", {}).items():
        counts[f"{name}_bn_stats"] = count_params(tree)
    return counts
