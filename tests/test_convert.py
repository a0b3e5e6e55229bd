"""Importing the authors' published checkpoints (``simclrv2_jax.convert``).

The fixtures (``../shared/fixtures/official`` beside the repository; see its README) were written by
the authors' own TF1 and TF2 code: a small SK-ResNet with one bottleneck block per group, every
variable randomised, and its outputs on four images. Converting them and running this project's
model must give the same outputs; the full variable lists of R50-1x-SK0 and R152-3x-SK1 must map
onto models built from the inferred configs, variable for variable.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclrv2_jax.checkpoints import release as convert
from simclrv2_jax.models.resnet import block_layout

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "official"
needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"official-checkpoint fixtures not found at {FIXTURES}"
)

TF1 = FIXTURES / "tf1_checkpoint"
TF2 = FIXTURES / "tf2_saved_model"
NAME_LISTS = FIXTURES / "tf1_variable_names"

# The fixture model: bottleneck SK-ResNet, [1, 1, 1, 1] blocks, width 0.25, 3-layer head to 32.
FIXTURE_CONFIG = dict(
    resnet_depth=14,
    block_counts=(1, 1, 1, 1),
    width_multiplier=0.25,
    sk_ratio=0.0625,
    se_ratio=0.0,
    proj_head_mode="nonlinear",
    num_proj_layers=3,
    proj_out_dim=32,
    num_classes=10,
    image_size=224,
)
TOLERANCE = 1e-4


def relative_error(actual, expected) -> float:
    """||actual - expected|| / ||expected||: the size of the error against the size of the output."""
    expected = np.asarray(expected, np.float64)
    return float(np.linalg.norm(np.asarray(actual, np.float64) - expected) / np.linalg.norm(expected))


@pytest.fixture(scope="module")
def tf1_weights():
    return convert.read_official(TF1)


@pytest.fixture(scope="module")
def tf2_weights():
    return convert.read_official(TF2)


def apply(model, variables, images, train):
    if train:
        outputs, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
    else:
        outputs = model.apply(variables, images, train=False)
    return {k: np.asarray(v) for k, v in outputs.items() if k != "hiddens"}


@needs_fixtures
def test_tf1_checkpoint_reproduces_reference_outputs():
    reference = np.load(TF1 / "reference.npz")
    model, variables = convert.load_official(TF1, ft_proj_selector=1)
    outputs = apply(model, variables, reference["images"], train=False)
    for name in ("final_avg_pool", "proj_head_output", "logits_sup"):
        expected = reference[f"eval/{name}"]
        assert outputs[name].shape == expected.shape, name
        assert relative_error(outputs[name], expected) < TOLERANCE, name


@needs_fixtures
def test_tf2_saved_model_reproduces_reference_outputs_in_both_modes():
    reference = np.load(TF2 / "reference.npz")
    model, variables = convert.load_official(TF2, ft_proj_selector=0)
    keys = [k for k in reference.files if k != "images"]
    assert {k.split("/")[0] for k in keys} == {"eval", "train"}
    for mode in ("eval", "train"):
        outputs = apply(model, variables, reference["images"], train=mode == "train")
        for key in (k for k in keys if k.startswith(mode + "/")):
            name = key.split("/", 1)[1]
            assert outputs[name].shape == reference[key].shape, key
            # train/proj_head_output is the worst: batch norm over 4 examples amplifies float32
            # rounding, ~5e-5 here (TF's own float32 result is as far from a float64 run).
            assert relative_error(outputs[name], reference[key]) < TOLERANCE, key


@needs_fixtures
def test_read_official_accepts_prefix_and_folder_and_drops_training_state(tf1_weights, tf2_weights):
    by_prefix = convert.read_official(TF1 / "model.ckpt-1")
    assert by_prefix.keys() == tf1_weights.keys()
    for weights in (tf1_weights, tf2_weights):
        assert not [n for n in weights if "Momentum" in n or "global_step" in n]
        assert all(v.dtype == np.float32 for v in weights.values())
    assert len(tf1_weights) == len(tf2_weights) == 135
    assert "head_contrastive/nl_2/batch_normalization/moving_mean" in tf1_weights
    assert "head_contrastive/nl_2/batch_normalization/beta" not in tf1_weights  # the last BN has no centre
    # TF2 names are the variables' names when saved, from the checkpoint's object graph.
    assert "resnet/conv2d_fixed_padding/conv2d/kernel" in tf2_weights
    assert "head_supervised/linear_layer/dense_3/kernel" in tf2_weights
    with pytest.raises(FileNotFoundError):
        convert.read_official(FIXTURES / "no_such_checkpoint")


def test_drop_training_state():
    names = {
        "global_step": 0,
        "base_model/conv2d/kernel": 1,
        "base_model/conv2d/kernel/Momentum": 2,
        "base_model/conv2d/kernel/ExponentialMovingAverage": 3,
        "ema_model/base_model/conv2d/kernel": 4,
    }
    assert convert.drop_training_state(names) == {"base_model/conv2d/kernel": 1}


@needs_fixtures
def test_infer_config_of_both_fixtures(tf1_weights, tf2_weights):
    assert convert.infer_config(tf1_weights, ft_proj_selector=1) == dict(FIXTURE_CONFIG, ft_proj_selector=1)
    assert convert.infer_config(tf2_weights, ft_proj_selector=0) == dict(FIXTURE_CONFIG, ft_proj_selector=0)


@needs_fixtures
def test_selector_from_the_supervised_kernel_width(tf1_weights):
    # Hiddens are [h 512, nl_0 512, nl_1 512, nl_2 32]: width 512 fits three selectors, so one must
    # be given; a head reading the 32-wide output is told by its width alone.
    with pytest.raises(convert.ConversionError, match="Pass ft_proj_selector"):
        convert.infer_config(tf1_weights)
    with pytest.raises(convert.ConversionError, match="ft_proj_selector=3 selects a hidden of width 32"):
        convert.infer_config(tf1_weights, ft_proj_selector=3)
    narrow = dict(tf1_weights)
    narrow["head_supervised/linear_layer/dense/kernel"] = np.zeros((32, 10), np.float32)
    assert convert.infer_config(narrow)["ft_proj_selector"] == 3
    assert convert.infer_config(narrow, ft_proj_selector=-1)["ft_proj_selector"] == -1
    with pytest.raises(convert.ConversionError, match="width 512"):
        convert.infer_config(narrow, ft_proj_selector=1)


def _name_list(name: str) -> dict[str, jax.ShapeDtypeStruct]:
    weights = {}
    for line in (NAME_LISTS / f"{name}.txt").read_text().splitlines():
        variable, shape = line.split(" ", 1)
        weights[variable] = jax.ShapeDtypeStruct(tuple(json.loads(shape)), jnp.float32)
    return convert.drop_training_state(weights)


@needs_fixtures
@pytest.mark.parametrize(
    "name, depth, width, sk_ratio",
    [("r50_1x_sk0", 50, 1.0, 0.0), ("r152_3x_sk1", 152, 3.0, 0.0625)],
)
def test_full_size_variable_lists_map_onto_the_inferred_model(name, depth, width, sk_ratio):
    weights = _name_list(name)
    config = convert.infer_config(weights, ft_proj_selector=1)
    assert config == dict(
        resnet_depth=depth,
        width_multiplier=width,
        sk_ratio=sk_ratio,
        se_ratio=0.0,
        proj_head_mode="nonlinear",
        num_proj_layers=3,
        proj_out_dim=32,
        ft_proj_selector=1,
        num_classes=1000,
        image_size=224,
    )
    variables = convert.map_official(weights, config)
    model = convert.build_model(config)
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    expected = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    # Same tree (every model variable filled, nothing else) and the same shape at every leaf.
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(expected)
    for got, want in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(expected)):
        assert got.shape == want.shape
    assert len(jax.tree_util.tree_leaves(variables)) == len(weights)


@needs_fixtures
def test_creation_order_matches_the_tf1_auto_names():
    # Spot checks of the counters against the R50 list: conv2d_1 is block 1's projection shortcut
    # (created before the block's own convs), batch_normalization_52 the last block's last BN.
    weights = _name_list("r50_1x_sk0")
    config = convert.infer_config(weights, ft_proj_selector=0)
    layers = convert.backbone_layers(config)
    convs = [path for kind, path in layers if kind == "conv"]
    bns = [path for kind, path in layers if kind == "bn"]
    assert len(convs) == 53 and len(bns) == 53
    assert convs[1] == ("backbone", "block_group1_0", "shortcut", "conv")
    assert bns[52] == ("backbone", "block_group4_2", "bn_2", "bn")
    assert weights["base_model/conv2d_1/kernel"].shape == (1, 1, 64, 256)


@needs_fixtures
def test_unknown_variables_are_named(tf1_weights):
    extra = dict(tf1_weights)
    extra["base_model/dense/kernel"] = np.zeros((512, 10), np.float32)
    extra["head_contrastive/nl_0/batch_normalization/renorm_mean"] = np.zeros((512,), np.float32)
    with pytest.raises(convert.ConversionError) as error:
        convert.map_official(extra, dict(FIXTURE_CONFIG, ft_proj_selector=1))
    message = str(error.value)
    assert "2 unknown variables" in message
    assert "base_model/dense/kernel" in message
    assert "head_contrastive/nl_0/batch_normalization/renorm_mean" in message
    # A variable of a known kind with no place in this model (the projection layers' dense layers
    # have no bias in front of their BN) is unknown too.
    biased = dict(tf1_weights)
    biased["head_contrastive/nl_0/dense/bias"] = np.zeros((512,), np.float32)
    with pytest.raises(convert.ConversionError, match="nl_0/dense"):
        convert.map_official(biased, dict(FIXTURE_CONFIG, ft_proj_selector=1))


@needs_fixtures
def test_missing_variables_are_named(tf1_weights):
    config = dict(FIXTURE_CONFIG, ft_proj_selector=1)
    missing = dict(tf1_weights)
    del missing["base_model/batch_normalization_5/moving_variance"]  # block 1's SK two-stream BN
    del missing["head_supervised/linear_layer/dense/bias"]
    with pytest.raises(convert.ConversionError) as error:
        convert.map_official(missing, config)
    message = str(error.value)
    assert "2 missing variables" in message
    assert "batch_stats/backbone/block_group1_0/sk_conv/bn_0/bn/var" in message
    assert "params/head_supervised/dense/bias" in message


@needs_fixtures
def test_shape_mismatches_are_named(tf1_weights):
    wrong = dict(tf1_weights)
    wrong["head_contrastive/nl_2/dense/kernel"] = np.zeros((512, 64), np.float32)
    with pytest.raises(convert.ConversionError, match="head_contrastive/nl_2/dense/kernel"):
        convert.map_official(wrong, dict(FIXTURE_CONFIG, ft_proj_selector=1))


def test_block_layout_takes_any_blocks_per_group():
    assert block_layout(50) == ("bottleneck", (3, 4, 6, 3))
    assert block_layout(14, (1, 1, 1, 1)) == ("bottleneck", (1, 1, 1, 1))
    assert block_layout(10, (1, 1, 1, 1)) == ("basic", (1, 1, 1, 1))
    with pytest.raises(ValueError, match="use 14 for bottleneck blocks or 10 for basic"):
        block_layout(50, (1, 1, 1, 1))
    with pytest.raises(ValueError, match="not supported"):
        block_layout(14)


_TF_BN_NAMES = {"scale": "gamma", "bias": "beta", "mean": "moving_mean", "var": "moving_variance"}


def _as_tf1_checkpoint(config, variables) -> dict[str, np.ndarray]:
    """A model's variables under the names the authors' TF1 graph gives them (creation order)."""

    def leaves(tree, path):
        for key in path:
            tree = tree[key]
        return tree

    weights = {}
    counters = {"conv": 0, "bn": 0}
    for kind, path in convert.backbone_layers(config):
        n = counters[kind]
        counters[kind] += 1
        if kind == "conv":
            layer = f"base_model/conv2d{f'_{n}' if n else ''}"
            for leaf, value in leaves(variables["params"], path).items():
                weights[f"{layer}/{leaf}"] = value
        else:
            layer = f"base_model/batch_normalization{f'_{n}' if n else ''}"
            for collection in ("params", "batch_stats"):
                for leaf, value in leaves(variables[collection], path).items():
                    weights[f"{layer}/{_TF_BN_NAMES[leaf]}"] = value
    prefix = "l" if config["proj_head_mode"] == "linear" else "nl"
    for j, layer in variables["params"].get("head_projection", {}).items():
        scope = f"head_contrastive/{prefix}_{j.split('_')[1]}"
        weights[f"{scope}/dense/kernel"] = layer["dense"]["kernel"]
        for collection in ("params", "batch_stats"):
            for leaf, value in variables[collection]["head_projection"][j]["bn"].items():
                weights[f"{scope}/batch_normalization/{_TF_BN_NAMES[leaf]}"] = value
    for leaf, value in variables["params"].get("head_supervised", {}).get("dense", {}).items():
        weights[f"head_supervised/linear_layer/dense/{leaf}"] = value
    return weights


@pytest.mark.parametrize(
    "arch",
    [
        # Basic blocks, CIFAR stem, squeeze-excitation, linear projection head.
        dict(
            resnet_depth=10, block_counts=(1, 1, 1, 1), se_ratio=0.25, proj_head_mode="linear", image_size=32
        ),
        # Basic blocks with SK: the ResNet-D stem and shortcuts (standard depth 18).
        dict(resnet_depth=18, sk_ratio=0.0625, proj_head_mode="nonlinear", num_proj_layers=2, image_size=224),
        # Bottleneck SK blocks under a CIFAR stem, uneven groups, no head and no supervised head.
        dict(
            resnet_depth=20, block_counts=(2, 1, 1, 2), sk_ratio=0.0625, proj_head_mode="none", image_size=32
        ),
    ],
)
def test_round_trip_through_tf1_names(arch):
    config = dict(
        width_multiplier=0.25,
        sk_ratio=0.0,
        se_ratio=0.0,
        num_proj_layers=3,
        proj_out_dim=128,
        ft_proj_selector=0,
        num_classes=10 if arch["proj_head_mode"] != "none" else 0,
    )
    config.update(arch)
    model = convert.build_model(config)
    images = jax.ShapeDtypeStruct((1, config["image_size"], config["image_size"], 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)

    weights = _as_tf1_checkpoint(config, variables)
    inferred = convert.infer_config(weights, ft_proj_selector=0)
    expected = dict(config)
    if arch["proj_head_mode"] != "nonlinear":
        expected["num_proj_layers"] = 3  # not used by these modes: the project's default
    if arch["proj_head_mode"] == "none":
        expected["proj_out_dim"] = 128
    assert inferred == expected
    converted = convert.map_official(weights, inferred)
    assert jax.tree_util.tree_structure(converted) == jax.tree_util.tree_structure(variables)
    for got, want in zip(jax.tree_util.tree_leaves(converted), jax.tree_util.tree_leaves(variables)):
        np.testing.assert_array_equal(got, want)


@needs_fixtures
def test_tf2_names_of_global_bn_models(tf2_weights):
    # TF2 runs with global_bn build SyncBatchNormalization layers: sync_batch_normalization_N.
    renamed = {
        n.replace("/batch_normalization", "/sync_batch_normalization"): v for n, v in tf2_weights.items()
    }
    assert any("sync_batch_normalization_22/" in n for n in renamed)
    config = convert.infer_config(renamed, ft_proj_selector=0)
    assert config == dict(FIXTURE_CONFIG, ft_proj_selector=0)
    converted = convert.map_official(renamed, config)
    reference = convert.map_official(tf2_weights, config)
    for got, want in zip(jax.tree_util.tree_leaves(converted), jax.tree_util.tree_leaves(reference)):
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------------
# The command line: convert, then fine-tune from and distill from the converted workdir.


def run_command(module, args, env):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.mark.slow
@needs_fixtures
def test_converted_fixture_finetunes_and_teaches_from_the_command_line(
    tmp_path, fake_data_dir, jax_compile_cache
):
    from conftest import numpy_metrics, read_checkpoint, split_images, subprocess_env

    from simclrv2_jax.data import device_augment

    env = subprocess_env(jax_compile_cache)
    converted = tmp_path / "converted"
    proc = run_command(
        "simclrv2_jax.convert", [f"--source={TF1}", f"--workdir={converted}", "--ft_proj_selector=1"], env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    # The workdir holds exactly the converted weights (read back with Orbax directly).
    saved = read_checkpoint(converted, 0)
    _, expected = convert.load_official(TF1, ft_proj_selector=1)
    for part in ("params", "batch_stats"):
        want = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected[part])}
        got = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(saved[part])}
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)

    # The evaluation command takes it as it is, on another data set (64 px keeps the ImageNet stem):
    # its numbers are those of the release model counted in NumPy on the same images.
    proc = run_command(
        "simclrv2_jax.evaluate",
        [
            f"--workdir={converted}",
            "--config.dataset=fashion_mnist",
            f"--config.data_dir={fake_data_dir}",
            "--config.image_size=64",
            "--config.eval_batch_size=40",
        ],
        env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    entry = json.loads((converted / "eval_results.json").read_text())["latest"]
    images, labels = split_images(fake_data_dir)
    model, variables = convert.load_official(TF1, ft_proj_selector=1)
    x = device_augment.preprocess_for_eval(images, height=64, width=64)
    expected = numpy_metrics(model.apply(variables, x, train=False)["logits_sup"], labels)
    assert (entry["step"], entry["eval_split"], entry["num_examples"]) == (0, "test", len(labels))
    assert entry["top1"] == pytest.approx(expected["top1"], abs=1e-9)
    assert entry["top5"] == pytest.approx(expected["top5"], abs=1e-9)
    assert entry["loss"] == pytest.approx(expected["loss"], rel=1e-5)

    # Fine-tuning and distillation take it as it is: no model flags (the architecture comes from the
    # converted config); 64 px keeps the release's ImageNet stem.
    common = [
        f"--config.data_dir={fake_data_dir}",
        "--config.image_size=64",
        "--config.train_batch_size=16",
        "--config.eval_batch_size=40",
        "--config.train_steps=2",
        "--config.label_fraction=1.0",
    ]
    finetuned = tmp_path / "finetune"
    proc = run_command(
        "simclrv2_jax.main",
        [
            "--config=configs/finetune.py:fashion_mnist",
            f"--workdir={finetuned}",
            f"--config.checkpoint={converted}",
        ]
        + common,
        env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((finetuned / "results.json").read_text())
    assert results["completed"] and results["init_checkpoint"] == str(converted)
    used = json.loads((finetuned / "config.json").read_text())
    assert (used["resnet_depth"], used["block_counts"], used["sk_ratio"]) == (14, [1, 1, 1, 1], 0.0625)

    distilled = tmp_path / "distill"
    proc = run_command(
        "simclrv2_jax.main",
        [
            "--config=configs/distill.py:fashion_mnist",
            f"--workdir={distilled}",
            f"--config.teacher_checkpoint={converted}",
        ]
        + common,
        env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((distilled / "results.json").read_text())
    assert results["completed"] and "teacher_top1" in results["eval"]


@pytest.mark.slow
@needs_fixtures
def test_the_package_alone_converts_a_release_checkpoint(tmp_path, jax_compile_cache):
    """An installed package (a wheel, Colab's pip install) has no repository: copied on its own, with
    neither configs/ nor the checkout on the path, it converts the authors' SavedModel into a workdir
    whose config is a full config of its stage."""
    import json
    import shutil
    import subprocess
    import sys

    from conftest import subprocess_env

    alone = tmp_path / "site"
    shutil.copytree(Path(convert.__file__).resolve().parents[1], alone / "simclrv2_jax")
    env = dict(subprocess_env(jax_compile_cache), PYTHONPATH=str(alone))
    workdir = tmp_path / "converted"
    code = (
        "import runpy, sys, simclrv2_jax; "
        "assert simclrv2_jax.__file__.startswith(sys.argv[1]), simclrv2_jax.__file__; "
        "sys.argv = ['convert'] + sys.argv[2:]; runpy.run_module('simclrv2_jax.convert', run_name='__main__')"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(alone),
            f"--source={TF2}",
            f"--workdir={workdir}",
            "--ft_proj_selector=0",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["stage"] == "finetune" and saved["num_classes"] == 10 and saved["ft_proj_selector"] == 0
    assert (workdir / "checkpoints" / "0" / "state").is_dir()
