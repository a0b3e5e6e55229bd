"""Projection head and supervised head.

Projection head (``proj_head_mode``):
  * ``nonlinear``: ``num_proj_layers`` dense+BN layers. Middle layers keep the input width, their BN
    has beta and is followed by ReLU; the last layer has ``proj_out_dim`` units, BN without beta and
    no ReLU. Dense layers followed by BN carry no bias.
  * ``linear``: one dense+BN (no beta) to ``proj_out_dim``.
  * ``none``: identity.
It returns the list ``[h, l1, ..., z]``. ``num_layers`` below lets fine-tuning build only the layers
up to ``ft_proj_selector``, so layers after it are dropped (and have no parameters).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from simclrv2_jax.config.fields import PROJ_HEAD_MODES
from simclrv2_jax.models.layers import BATCH_NORM_DECAY, dense_bn_layer, head_kernel_init


def num_head_layers(proj_head_mode: str, num_proj_layers: int) -> int:
    """How many dense+BN layers a projection head of this mode has."""
    if proj_head_mode not in PROJ_HEAD_MODES:
        raise ValueError(f"proj_head_mode={proj_head_mode!r} is not one of {PROJ_HEAD_MODES}.")
    return {"none": 0, "linear": 1, "nonlinear": num_proj_layers}[proj_head_mode]


def kept_head_layers(proj_head_mode: str, num_proj_layers: int, ft_proj_selector: int) -> int:
    """Number of head layers that feed ``hiddens[ft_proj_selector]`` (the rest are dropped)."""
    total = num_head_layers(proj_head_mode, num_proj_layers)
    index = ft_proj_selector if ft_proj_selector >= 0 else total + 1 + ft_proj_selector
    if not 0 <= index <= total:
        raise ValueError(
            f"ft_proj_selector={ft_proj_selector} is out of range for a {proj_head_mode} projection head "
            f"with {total} layer(s): use a value in [{-(total + 1)}, {total}]."
        )
    return index


class ProjectionHead(nn.Module):
    proj_head_mode: str = "nonlinear"
    num_proj_layers: int = 3
    proj_out_dim: int = 128
    num_layers: int | None = None  # build only the first ``num_layers`` layers (fine-tuning)
    num_groups: int = 0
    momentum: float = BATCH_NORM_DECAY
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, train: bool) -> list[jax.Array]:
        total = num_head_layers(self.proj_head_mode, self.num_proj_layers)
        build = total if self.num_layers is None else min(self.num_layers, total)
        common = dict(num_groups=self.num_groups, momentum=self.momentum, dtype=self.dtype)
        hiddens = [h]
        x = h
        for j in range(build):
            last = j == total - 1
            if last:
                x = dense_bn_layer(
                    self.proj_out_dim, use_bn=True, use_bias=False, name=f"layer_{j}", **common
                )(x, train)
            else:
                x = dense_bn_layer(None, use_bn=True, use_bias=True, name=f"layer_{j}", **common)(x, train)
                x = nn.relu(x)
            hiddens.append(x)
        return hiddens


class SupervisedHead(nn.Module):
    """One dense layer with bias; ``zero_init`` gives the release's ``zero_init_logits_layer``."""

    num_classes: int
    zero_init: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.zero_init else head_kernel_init
        logits = nn.Dense(
            self.num_classes,
            use_bias=True,
            kernel_init=init,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="dense",
        )(x)
        return logits.astype(jnp.float32)
