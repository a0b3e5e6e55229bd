"""Each user mistake gets one clear error that names the field or the path.

That a stopped run loses no data (Ctrl-C/SIGTERM saves a checkpoint of the step it stopped at) is
checked in test_resume.py, on the same kind of run.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import flat, read_checkpoint, tiny

from simclrv2_jax.checkpoints import CheckpointError
from simclrv2_jax.config import get_config
from simclrv2_jax.config.validation import validate
from simclrv2_jax.data import sources
from simclrv2_jax.train import parallel, train_stage
from simclrv2_jax.train import pretrain as pretrain_stage

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_unknown_override_on_the_command_line(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "simclrv2_jax.main",
            "--config=configs/pretrain.py:fashion_mnist",
            f"--workdir={workdir}",
            "--config.train_steps=2",
            "--config.no_such_field=1",
        ],
        cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode != 0
    assert "no_such_field" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not workdir.exists()  # refused before anything ran


@pytest.mark.parametrize(
    "stage, field, value",
    [
        ("pretrain", "learning_rate_scaling", "cube"),
        ("pretrain", "train_batch_size", 0),
        ("finetune", "ft_proj_selector", 7),  # the 3-layer head has hiddens[-4..3]
        ("pretrain", "optimizer", "sgd"),
        ("finetune", "label_fraction", 1.5),
    ],
)
def test_impossible_value_names_the_field(stage, field, value):
    config = get_config(stage, "fashion_mnist")
    validate(config)  # the preset itself is fine
    config[field] = value
    with pytest.raises(ValueError) as info:
        validate(config)
    message = str(info.value)
    assert re.search(rf"\b{field}=", message), message
    assert str(value) in message


@pytest.mark.parametrize(
    "stage, field, value",
    [
        ("pretrain", "learning_rate", float("nan")),
        ("pretrain", "learning_rate", float("inf")),
        ("pretrain", "temperature", float("nan")),
        ("finetune", "weight_decay", float("-inf")),
    ],
)
def test_non_finite_value_names_the_field(stage, field, value):
    config = get_config(stage, "fashion_mnist")
    config[field] = value
    with pytest.raises(ValueError, match=rf"\b{field}=.*finite"):
        validate(config)


@pytest.mark.slow
def test_impossible_value_stops_a_run_before_it_starts(tmp_path, fake_data_dir):
    config = tiny(get_config("pretrain", "fashion_mnist"), fake_data_dir, train_steps=2, optimizer="sgd")
    with pytest.raises(ValueError, match=r"\boptimizer="):
        train_stage(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_batch_not_divisible_by_devices(tmp_path, fake_data_dir):
    config = tiny(get_config("pretrain", "fashion_mnist"), fake_data_dir, train_steps=2, train_batch_size=12)
    with pytest.raises(ValueError) as info:
        train_stage(config, str(tmp_path / "run"))  # all 8 devices
    message = str(info.value)
    assert "train_batch_size=12" in message and "8 devices" in message
    # The nearest multiples of 8 are offered.
    assert "train_batch_size=8" in message and "16" in message


def test_missing_data_names_the_path(tmp_path, monkeypatch):
    # Without the Debian package to fall back on (see the next test for why that matters here).
    monkeypatch.setattr(sources, "DEFAULT_FASHION_MNIST_DIR", str(tmp_path / "no_package"))
    empty = tmp_path / "empty"
    empty.mkdir()
    config = tiny(get_config("pretrain", "fashion_mnist"), empty, train_steps=2)
    with pytest.raises(FileNotFoundError) as info:
        train_stage(config, str(tmp_path / "run"))
    message = str(info.value)
    assert str(empty) in message and "data_dir" in message
    assert "train-images-idx3-ubyte.gz" in message


@pytest.mark.skipif(
    not os.path.isdir(sources.DEFAULT_FASHION_MNIST_DIR),
    reason="only matters where the dataset-fashion-mnist package is installed",
)
def test_explicit_data_dir_without_the_files_is_an_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    config = tiny(get_config("pretrain", "fashion_mnist"), empty, train_steps=2)
    with pytest.raises(FileNotFoundError, match=re.escape(str(empty))):
        pretrain_stage.build(config, parallel.create_mesh(1))


def ft_config(data_dir, checkpoint, **overrides):
    # The settings of test_stages' fine-tunes, so that their compiled initialiser is reused.
    return tiny(
        get_config("finetune", "fashion_mnist"),
        data_dir,
        train_steps=2,
        checkpoint=str(checkpoint),
        seed=1,
        examples_per_class=2,
        zero_init_logits_layer=True,
        ft_proj_selector=1,
        **overrides,
    )


@pytest.mark.parametrize("where", ["missing", "no_checkpoint_yet"])
def test_finetune_checkpoint_that_is_not_there(tmp_path, fake_data_dir, where):
    path = tmp_path / "pretrain_run"
    if where == "no_checkpoint_yet":
        (path / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError) as info:
        train_stage(ft_config(fake_data_dir, path), str(tmp_path / "run"), mesh=parallel.create_mesh(1))
    assert str(path) in str(info.value)


@pytest.fixture(scope="module")
def incompatible(fake_data_dir, pretrain_run):
    """Restoring the width-0.125 pretraining run into a width-0.25 fine-tuning model.

    (``train_stage`` itself adopts the checkpoint's architecture, see ``test_finetune_adopts_the_
    checkpoint_architecture``; the mismatch message is what a checkpoint without a usable config, or
    a model built by hand, gets.)"""
    import jax
    import jax.numpy as jnp

    from simclrv2_jax.checkpoints import SavedRun
    from simclrv2_jax.train import components

    config = ft_config(fake_data_dir, pretrain_run["workdir"], width_multiplier=0.25)
    mesh = parallel.create_mesh(1)
    model = components.build_model(config, head_mode="finetune", num_classes=10, mesh=mesh)
    images = jnp.zeros((2, config.image_size, config.image_size, 3), jnp.float32)
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    target = {"params": dict(abstract["params"]), "batch_stats": abstract["batch_stats"]}
    target["params"].pop("head_supervised")
    with pytest.raises(CheckpointError) as info:
        SavedRun(str(pretrain_run["workdir"])).load_variables(
            target,
            sharding=parallel.replicated(mesh),
            what="pretraining checkpoint",
        )
    return str(info.value)


@pytest.mark.slow
def test_finetune_adopts_the_checkpoint_architecture(tmp_path, fake_data_dir, pretrain_run):
    """Fine-tuning has the network of the checkpoint it starts from: a width given on the command
    line that differs is replaced by the checkpoint's (and logged), and the run trains."""
    config = ft_config(fake_data_dir, pretrain_run["workdir"], width_multiplier=0.25)
    results = train_stage(config, str(tmp_path / "run"), mesh=parallel.create_mesh(1))
    assert results["completed"] and config.width_multiplier == pretrain_run["config"].width_multiplier


@pytest.mark.slow
def test_incompatible_checkpoint_lists_both_shapes(incompatible, pretrain_run):
    # The first block group has 64 * width channels: 8 in the checkpoint, 16 in the new model.
    assert (
        "['batch_stats']['backbone']['block_group1_0']['bn_0']['bn']['mean']: "
        "checkpoint has shape (8,), model needs (16,)"
    ) in incompatible
    assert str(pretrain_run["workdir"]) in incompatible
    assert "width_multiplier" in incompatible


@pytest.mark.slow
def test_incompatible_checkpoint_counts_the_lines_it_does_not_show(incompatible, pretrain_run):
    # Every backbone variable scales with the width, and so does each of the 5 variables of
    # projection layer_0 (dense kernel, BN scale, bias, mean, var), the one head layer fine-tuning
    # from ft_proj_selector=1 keeps. Nothing is missing; 10 mismatches are printed.
    saved = read_checkpoint(pretrain_run["workdir"])
    mismatched = len(flat(saved["params"]["backbone"])) + len(flat(saved["batch_stats"]["backbone"])) + 5
    shown = len(re.findall(r": checkpoint has shape ", incompatible))
    assert shown == 10
    assert f"... and {mismatched - shown} more" in incompatible
