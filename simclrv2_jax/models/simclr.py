"""The whole SimCLRv2 model: backbone + projection head + supervised head.

Two head modes share one parameter layout (``backbone``, ``head_projection``, ``head_supervised``),
so a stage's checkpoint restores into the next stage by name:

* ``pretrain``: the full projection head gives ``z = hiddens[-1]`` for the contrastive loss; with
  ``lineareval_while_pretraining`` the supervised head is trained at the same time on
  ``stop_gradient(hiddens[ft_proj_selector])`` (``h`` at the default 0), as the TF2 release does, so
  no label information reaches the representation.
* ``finetune``: only the projection-head layers up to ``ft_proj_selector`` are built; the supervised
  head reads ``hiddens[ft_proj_selector]`` (0 = backbone output, 1 = after the first head layer, the
  SimCLRv2 choice, -1 = the last layer). Distillation students use this mode too.
* ``full``: the layout and outputs of the authors' released checkpoints (``simclrv2_jax.convert``):
  the whole projection head is built and gives ``proj_head_output``, and the supervised head reads
  ``hiddens[ft_proj_selector]``. With ``num_classes = 0`` there is no supervised head (checkpoints
  saved without one).

The model returns a dict of named features: the backbone endpoints, ``proj_head_input``,
``proj_head_output`` and ``logits_sup``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from simclrv2_jax.models.heads import ProjectionHead, SupervisedHead, kept_head_layers
from simclrv2_jax.models.layers import BATCH_NORM_DECAY
from simclrv2_jax.models.resnet import ResNet

HEAD_MODES = ("pretrain", "finetune", "full")


class SimCLRModel(nn.Module):
    resnet_depth: int = 50
    width_multiplier: float = 1.0
    sk_ratio: float = 0.0
    se_ratio: float = 0.0
    cifar_stem: bool = False
    block_counts: tuple[int, ...] | None = None  # blocks per group; None: those of resnet_depth
    proj_head_mode: str = "nonlinear"
    num_proj_layers: int = 3
    proj_out_dim: int = 128
    ft_proj_selector: int = 0
    num_classes: int = 1000
    head_mode: str = "pretrain"
    lineareval_while_pretraining: bool = True
    zero_init_logits_layer: bool = False
    fine_tune_after_block: int = -1
    num_bn_groups: int = 0  # 0: global BN; k: per-device BN over k devices
    batch_norm_decay: float = BATCH_NORM_DECAY
    dtype: Any = jnp.float32
    remat: bool = False  # recompute each residual block in the backward pass (ResNet.remat)
    scan_blocks: bool = False  # each group's repeated blocks as one scanned loop (ResNet.scan_blocks)
    gather_blocks: Any = None  # ResNet.gather_blocks (set inside the train step under fsdp)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> dict[str, jax.Array]:
        if self.head_mode not in HEAD_MODES:
            raise ValueError(f"head_mode={self.head_mode!r} is not one of {HEAD_MODES}.")
        h, outputs = ResNet(
            depth=self.resnet_depth,
            width_multiplier=self.width_multiplier,
            sk_ratio=self.sk_ratio,
            se_ratio=self.se_ratio,
            cifar_stem=self.cifar_stem,
            block_counts=self.block_counts,
            fine_tune_after_block=self.fine_tune_after_block if self.head_mode != "pretrain" else -1,
            num_groups=self.num_bn_groups,
            momentum=self.batch_norm_decay,
            dtype=self.dtype,
            remat=self.remat,
            scan_blocks=self.scan_blocks,
            gather_blocks=self.gather_blocks,
            name="backbone",
        )(images, train)
        outputs = dict(outputs)
        outputs["proj_head_input"] = h
        # Index of the hiddens the supervised head reads (0 = h).
        selected = kept_head_layers(self.proj_head_mode, self.num_proj_layers, self.ft_proj_selector)
        num_layers = selected if self.head_mode == "finetune" else None
        hiddens = ProjectionHead(
            proj_head_mode=self.proj_head_mode,
            num_proj_layers=self.num_proj_layers,
            proj_out_dim=self.proj_out_dim,
            num_layers=num_layers,
            num_groups=self.num_bn_groups,
            momentum=self.batch_norm_decay,
            dtype=self.dtype,
            name="head_projection",
        )(h, train)
        outputs["hiddens"] = hiddens
        supervised = SupervisedHead(
            self.num_classes, zero_init=self.zero_init_logits_layer, dtype=self.dtype, name="head_supervised"
        )
        if self.head_mode == "pretrain":
            outputs["proj_head_output"] = hiddens[-1]
            if self.lineareval_while_pretraining:
                # The TF2 release (TF1 has no linear evaluation while pretraining): hiddens[selector].
                outputs["logits_sup"] = supervised(jax.lax.stop_gradient(hiddens[selected]))
        elif self.head_mode == "finetune":
            feature = hiddens[-1]  # == hiddens[ft_proj_selector]: later layers were not built
            outputs["proj_head_output"] = feature
            outputs["logits_sup"] = supervised(feature)
        else:
            outputs["proj_head_output"] = hiddens[-1]
            if self.num_classes > 0:
                outputs["logits_sup"] = supervised(hiddens[selected])
        return outputs


def parameter_counts(model: SimCLRModel, image_size: int, channels: int = 3) -> dict[str, int]:
    """Parameter count per top-level part, from shapes only (``jax.eval_shape``, nothing allocated).

    Keys: ``backbone``, ``head_projection``, ``head_supervised``, ``total`` (trainable parameters) and
    ``<part>_bn_stats`` (BN moving mean/variance). The paper's Table 1 counts every variable of the
    backbone, BN statistics included: ``backbone + backbone_bn_stats`` rounds to its numbers for all
    thirteen models (e.g. R152-2x: 232.25M trainable + 0.32M statistics = 233M).
    """

    def count(tree: Any) -> int:
        return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))

    images = jax.ShapeDtypeStruct((2, image_size, image_size, channels), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    counts = {name: count(tree) for name, tree in variables["params"].items()}
    counts["total"] = sum(counts.values())
    for name, tree in variables.get("batch_stats", {}).items():
        counts[f"{name}_bn_stats"] = count(tree)
    return counts
