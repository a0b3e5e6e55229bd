"""Behaviours of the authors' TF1 release that the presets and stages must reproduce.

Each expected value is read off the release (its README commands and code, named in each test),
not computed by this package. The other fidelity tests sit beside the code they check: the fine-tuned
variables in ``test_stages.py``, the eval crop in ``test_augment.py``, the BN moving variance in
``test_models.py``, the distillation loss in ``test_losses.py`` and the file order of streamed data
in ``test_data_pipeline.py``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from simclrv2_jax.config import get_config
from simclrv2_jax.train import losses, parallel
from simclrv2_jax.train import pretrain as pretrain_stage


@pytest.mark.parametrize(
    "presets", ["imagenet", "imagenet,1pct", "imagenet,10pct", "imagenet,100pct", "cifar10", "fashion_mnist"]
)
def test_fine_tuning_presets_zero_init_the_logits_layer(presets):
    """Every fine-tuning command in the release's README sets --zero_init_logits_layer=True."""
    assert get_config("finetune", presets).zero_init_logits_layer is True


@pytest.mark.parametrize("presets", ["imagenet", "imagenet,1pct", "imagenet,10pct", "cifar10"])
def test_release_presets_keep_the_projection_layers_fixed(presets):
    """TF1 ``model.py``: fine-tuning trains ``trainable_variables_inblock_{after+1..5}`` only, i.e. the
    backbone blocks and ``head_supervised``, never ``head_contrastive``."""
    assert get_config("finetune", presets).train_proj_head_in_finetune is False


def test_fashion_mnist_preset_takes_the_measured_choice():
    """benchmarks/results/finetune_head.json: the trained head won on every seed (mean of 3)."""
    import json
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "finetune_head.json")
    with open(path) as f:
        settings = json.load(f)["settings"]
    means = {name.endswith("True"): s["mean_top1"] for name, s in settings.items()}
    assert get_config("finetune", "fashion_mnist").train_proj_head_in_finetune is (means[True] > means[False])


def test_linear_eval_preset_is_the_release_command():
    """The release README's linear evaluation: --train_mode=finetune --fine_tune_after_block=4
    --zero_init_logits_layer=True --global_bn=False --optimizer=momentum --learning_rate=0.1
    --weight_decay=0 --train_epochs=90 --train_batch_size=4096 --warmup_epochs=0, the head on the
    backbone output, all labels, 224 px on ImageNet's validation split."""
    c = get_config("finetune", "imagenet,linear_eval")
    expected = dict(
        fine_tune_after_block=4,
        zero_init_logits_layer=True,
        global_bn=False,
        optimizer="momentum",
        momentum=0.9,
        learning_rate=0.1,
        learning_rate_scaling="linear",
        weight_decay=0.0,
        train_epochs=90.0,
        train_batch_size=4096,
        warmup_epochs=0.0,
        ft_proj_selector=0,
        label_fraction=1.0,
        examples_per_class=0,
        image_size=224,
        dataset="imagenet2012",
        eval_split="validation",
    )
    assert {k: c[k] for k in expected} == expected


def test_group_major_layout_by_hand():
    """Two parts of 4 rows over 2 groups: each group's rows hold its two examples of each part."""
    a = jnp.arange(4)
    b = 100 + jnp.arange(4)
    laid = parallel.group_major([a, b], 2)
    assert laid.tolist() == [0, 1, 100, 101, 2, 3, 102, 103]
    assert parallel.part_major(laid, 2, 2).tolist() == [0, 1, 2, 3, 100, 101, 102, 103]
    # Global BN: the parts one after the other, as before.
    assert parallel.group_major([a, b], 0).tolist() == [0, 1, 2, 3, 100, 101, 102, 103]


def test_per_device_bn_groups_hold_both_views_of_a_device_images(fake_data_dir):
    """With global_bn=False each replica of the release normalises its own images' two views
    together. On 2 devices with 4 images, device 0's rows (one BN group) must be both views of images
    0 and 1; NT-Xent still pairs view A of image i with view B of image i."""
    from conftest import tiny

    config = tiny(
        get_config("pretrain", "fashion_mnist"),
        fake_data_dir,
        train_steps=1,
        global_bn=False,
        train_batch_size=4,
        lineareval_while_pretraining=False,
    )
    task = pretrain_stage.build(config, parallel.create_mesh(2))
    h = w = 2
    # image[i, v] is filled with 100 * v + i: which example and which view.
    views = np.stack([np.stack([np.full((h, w, 3), 100.0 * v + i) for v in (0, 1)]) for i in range(4)])
    batch = {"image": jnp.asarray(views, jnp.float32), "label": jnp.arange(4), "mask": jnp.ones(4)}
    images, laid_out = task.model_inputs(batch)
    assert images[:, 0, 0, 0].tolist() == [0, 1, 100, 101, 2, 3, 102, 103]
    assert laid_out["label"].tolist() == [0, 1, 0, 1, 2, 3, 2, 3]

    # The loss sees z in the release's order, rows [A0..A3, B0..B3]: z rows made from the laid-out
    # images, then the same z laid out by hand.
    rng = np.random.default_rng(0)
    z_by_row = {float(v): rng.normal(size=5) for v in images[:, 0, 0, 0].tolist()}
    z_laid = jnp.asarray(np.stack([z_by_row[float(v)] for v in images[:, 0, 0, 0].tolist()]), jnp.float32)
    z_release = jnp.asarray(
        np.stack([z_by_row[float(v)] for v in [0, 1, 2, 3, 100, 101, 102, 103]]), jnp.float32
    )
    got, _ = task.loss_fn({"proj_head_output": z_laid}, laid_out, None)
    want, _ = losses.nt_xent_loss(z_release, temperature=config.temperature)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    # Laid out the old way (view A rows, then view B rows) the pairs would be wrong.
    wrong, _ = losses.nt_xent_loss(z_laid, temperature=config.temperature)
    assert abs(float(wrong) - float(want)) > 1e-3
