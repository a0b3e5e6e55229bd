"""Export to a TF2 SavedModel (``simclrv2_jax.export``): the loaded model is called like the authors'
released SavedModels and returns what the Flax model returns.

The runs are tiny workdirs written with this project's own pieces -- the stage config of
``conftest.tiny``, a ``TrainState`` saved by ``checkpoints.Checkpointer`` and ``config.json`` beside
it, as the training loop writes them -- but with every variable drawn at random instead of trained:
two training steps cost over a minute of compiling on 2 cores, and random BN statistics and scales
(the initialisation has zero gammas that hide a whole residual branch) make any wrong layer show.
The Flax reference is built here from the config and those variables, independently of the
exporter's own loader. Every comparison is the relative error ``||a - b|| / ||b||``.
"""

import contextlib
import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from conftest import NUM_CLASSES, subprocess_env, tiny

from simclrv2_jax.checkpoints import Checkpointer, SavedRun
from simclrv2_jax.checkpoints import savedmodel as export
from simclrv2_jax.checkpoints.saved_run import head_mode_of
from simclrv2_jax.config import get_config
from simclrv2_jax.train import components, parallel
from simclrv2_jax.train.state import create_train_state

# Whole runs, subprocesses or processes: left out of the fast loop (launch/test.sh --fast).
pytestmark = pytest.mark.slow


REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "official"
RELEASE = FIXTURES / "tf2_saved_model"
needs_release = pytest.mark.skipif(
    not RELEASE.is_dir(), reason=f"official-checkpoint fixtures not found at {FIXTURES}"
)
TOLERANCE = 1e-4
STEPS = (1, 2)  # two checkpoints per workdir, with different weights; the latest is step 2


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def assert_close(actual: dict, expected: dict, what: str, tolerance: float = TOLERANCE) -> None:
    """Same names, same shapes, every output within ``tolerance`` relative."""
    assert sorted(actual) == sorted(expected), f"{what}: outputs {sorted(actual)} != {sorted(expected)}"
    errors = {}
    for name in expected:
        a, e = np.asarray(actual[name]), np.asarray(expected[name])
        assert a.shape == e.shape, f"{what}: {name} has shape {a.shape}, expected {e.shape}"
        errors[name] = relative_error(a, e)
    bad = {k: v for k, v in errors.items() if not v <= tolerance}
    assert not bad, f"{what}: relative errors above {tolerance}: {bad}"


def random_variables(abstract, seed: int) -> dict:
    """Every leaf drawn at random: kernels ~ N(0, 1/fan_in), BN scales in [0.5, 1.5], BN variances in
    [0.5, 2], BN means and biases ~ N(0, 0.2)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = str(path[-1].key), leaf.shape
        if name == "var":
            value = rng.uniform(0.5, 2.0, shape)
        elif name == "scale":
            value = rng.uniform(0.5, 1.5, shape)
        elif name in ("mean", "bias"):
            value = rng.normal(0.0, 0.2, shape)
        else:
            value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape)
        return value.astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def make_workdir(path: Path, config, head_mode: str, num_classes: int) -> tuple:
    """A workdir as a run leaves it: ``config.json`` and a ``TrainState`` checkpoint per step of
    ``STEPS`` (random weights, different at each step). Returns ``(reference model, {step: variables})``."""
    model = components.build_model(
        config, head_mode=head_mode, num_classes=num_classes, mesh=parallel.create_mesh(1)
    )
    images = jax.ShapeDtypeStruct((2, config.image_size, config.image_size, 3), jnp.float32)
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    tx, _ = components.optimizer(config, num_examples=200, total_steps=max(STEPS))
    checkpointer = Checkpointer(str(path), async_save=False)
    saved = {}
    for step in STEPS:
        variables = random_variables(dict(abstract), seed=step)
        state = create_train_state(lambda key, v=variables: v, tx, config.seed)
        checkpointer.save(step, state.replace(step=jnp.asarray(step, jnp.int32)), config)
        saved[step] = variables
    checkpointer.wait_until_finished()
    checkpointer.close()
    (path / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    return model, saved


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, (n, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def pretrain(tmp_path_factory, fake_data_dir):
    """A tiny pretraining workdir exported with the defaults (the run's image size, differentiable,
    lowered for cpu, cuda and tpu), loaded once, and the Flax model's outputs (jitted) to compare with."""
    root = tmp_path_factory.mktemp("export_pretrain")
    config = tiny(get_config("pretrain", "fashion_mnist"), fake_data_dir, train_steps=max(STEPS))
    model, saved = make_workdir(root / "run", config, "pretrain", NUM_CLASSES)
    info = export.export_saved_model(str(root / "run"), str(root / "saved_model"))

    @functools.partial(jax.jit, static_argnames="train")
    def flax_outputs(variables, images, train):
        """The named outputs (not the list of hiddens), and the new BN statistics in training mode."""
        if train:
            outputs, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        else:
            outputs, updates = model.apply(variables, images, train=False), {"batch_stats": None}
        return {k: v for k, v in outputs.items() if k != "hiddens"}, updates["batch_stats"]

    return dict(
        root=root,
        config=config,
        model=model,
        variables=saved[max(STEPS)],
        saved=saved,
        info=info,
        loaded=tf.saved_model.load(str(root / "saved_model")),
        flax_outputs=flax_outputs,
    )


@contextlib.contextmanager
def variables_kept(variables):
    """Puts the values of the loaded model's ``variables`` back afterwards, so that one loaded model
    (and its compiled programs) serves every test although training-mode calls move BN statistics."""
    kept = [v.numpy() for v in variables]
    try:
        yield
    finally:
        for variable, value in zip(variables, kept):
            variable.assign(value)


def numpy_outputs(outputs: dict) -> dict:
    return {k: np.asarray(v) for k, v in outputs.items()}


def test_export_is_called_like_the_release(pretrain):
    loaded, size = pretrain["loaded"], pretrain["config"].image_size
    signatures = sorted(
        (str(args[0].shape), args[0].dtype.name, args[0].name, args[1])
        for args, kwargs in (f.structured_input_signature for f in loaded.__call__.concrete_functions)
    )
    assert signatures == [
        (f"(None, {size}, {size}, 3)", "float32", "inputs", False),
        (f"(None, {size}, {size}, 3)", "float32", "inputs", True),
    ]
    images = random_images(4, size)
    expected = sorted(pretrain["flax_outputs"](pretrain["variables"], images, train=False)[0])
    assert sorted(loaded(images, trainable=False)) == expected
    assert sorted(loaded(images, False)) == expected  # positional, as the release allows
    if RELEASE.is_dir():  # a pretraining run has every output the release has, under the same names
        release = tf.saved_model.load(str(RELEASE)).__call__.concrete_functions[0]
        spec = release.structured_input_signature[0][0]
        assert (spec.name, spec.dtype) == ("inputs", tf.float32)
        assert expected == sorted(release.structured_outputs)
    info = json.loads((pretrain["root"] / "saved_model" / export.INFO_PATH).read_text())
    assert info["step"] == max(STEPS) and info["head_mode"] == "pretrain" and info["with_gradient"]
    assert sorted(info["outputs"]) == expected and info["platforms"] == list(export.DEFAULT_PLATFORMS)
    assert info["input_shape"] == [None, size, size, 3]


def test_inference_outputs_match_flax_for_any_batch_size(pretrain):
    for n in (4, 1):
        images = random_images(n, pretrain["config"].image_size, seed=n)
        expected, _ = pretrain["flax_outputs"](pretrain["variables"], images, train=False)
        actual = pretrain["loaded"](images, trainable=False)
        assert_close(numpy_outputs(actual), numpy_outputs(expected), f"trainable=False, batch {n}")


def test_training_mode_uses_batch_statistics_and_moves_them(pretrain):
    loaded = pretrain["loaded"]
    images = random_images(4, pretrain["config"].image_size, seed=4)
    expected, new_stats = pretrain["flax_outputs"](pretrain["variables"], images, train=True)
    with variables_kept(loaded.batch_stats_list):
        actual = loaded(images, trainable=True)
        assert_close(numpy_outputs(actual), numpy_outputs(expected), "trainable=True")
        # Like the release's Keras batch norms, a call in training mode moves the moving statistics.
        moved = {v.name.split(":")[0]: v.numpy() for v in loaded.batch_stats_list}
        wanted = {
            "batch_stats/" + "/".join(str(k.key) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(new_stats)
        }
        assert_close(moved, wanted, "moving statistics after trainable=True")
    assert_close(  # and variables_kept put them back for the other tests
        numpy_outputs(loaded(images, trainable=False)),
        numpy_outputs(pretrain["flax_outputs"](pretrain["variables"], images, train=False)[0]),
        "inference after restoring the statistics",
    )


def test_weights_are_variables_with_gradients(pretrain):
    loaded = pretrain["loaded"]
    leaves = jax.tree_util.tree_leaves_with_path(pretrain["variables"]["params"])
    weights = loaded.trainable_variables_list
    assert len(weights) == len(leaves) and all(w.trainable for w in weights)
    assert [w.name.split(":")[0] for w in weights] == [
        "params/" + "/".join(str(k.key) for k in path) for path, _ in leaves
    ]
    images = random_images(4, pretrain["config"].image_size, seed=7)

    def loss() -> tf.Tensor:
        return tf.reduce_sum(tf.square(loaded(images, trainable=True)["proj_head_output"]))

    with variables_kept(list(weights) + list(loaded.batch_stats_list)):
        with tf.GradientTape() as tape:
            value = loss()
        gradients = tape.gradient(value, weights)
        assert all(g is not None for g in gradients)
        # The contrastive output does not depend on the linear-evaluation head; every other weight moves it.
        for (path, _), g in zip(leaves, gradients):
            zero = not np.any(g.numpy())
            assert zero == ("head_supervised" in jax.tree_util.keystr(path)), jax.tree_util.keystr(path)
        # The gradient is the loss's: a central difference along a random direction of every weight.
        rng = np.random.default_rng(0)
        directions = [rng.normal(size=w.shape).astype(np.float32) * np.std(w.numpy()) for w in weights]
        slope = sum(float(np.sum(g.numpy() * d)) for g, d in zip(gradients, directions))
        epsilon = 1e-3
        values = []
        for sign in (1.0, -1.0):
            for w, d in zip(weights, directions):
                w.assign_add(sign * epsilon * d)
            values.append(float(loss()))
            for w, d in zip(weights, directions):
                w.assign_sub(sign * epsilon * d)
        difference = (values[0] - values[1]) / (2 * epsilon)
        assert abs(difference - slope) <= 1e-2 * abs(slope), (difference, slope)

        # The outputs read the variables: a new bias shows in the logits at once.
        bias = next(w for w in weights if w.name.startswith("params/head_supervised/dense/bias"))
        before = loaded(images, trainable=False)["logits_sup"].numpy()
        bias.assign_add(tf.ones_like(bias))
        after = loaded(images, trainable=False)["logits_sup"].numpy()
        np.testing.assert_allclose(after - before, np.ones_like(before), atol=1e-5)


def test_step_selects_the_checkpoint(pretrain):
    run = SavedRun(str(pretrain["root"] / "run")).load_model(step=1)
    assert run.step == 1 and run.head_mode == "pretrain" and run.num_classes == NUM_CLASSES
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(run.variables), jax.tree_util.tree_leaves(pretrain["saved"][1])
    ):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    with pytest.raises(ValueError, match=r"No checkpoint of step 5 under .*; it has steps \[1, 2\]"):
        SavedRun(str(pretrain["root"] / "run")).load_model(step=5)


def test_finetune_run_takes_its_classes_from_the_checkpoint(tmp_path, fake_data_dir):
    # num_classes = 0 ("from the data set") in the config: the head's kernel says 7.
    config = tiny(get_config("finetune", "fashion_mnist"), fake_data_dir, train_steps=2, ft_proj_selector=1)
    assert config.num_classes == 0
    make_workdir(tmp_path / "run", config, "finetune", num_classes=7)
    run = SavedRun(str(tmp_path / "run")).load_model()
    assert (run.head_mode, run.num_classes, run.channels, run.step) == ("finetune", 7, 3, max(STEPS))
    shapes = jax.eval_shape(
        lambda x: run.model.apply(run.variables, x, train=False),
        jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32),
    )
    assert shapes["logits_sup"].shape == (2, 7)
    # ft_proj_selector = 1: the fine-tuned network ends after the first projection layer (64 units).
    assert shapes["proj_head_output"].shape == (2, 64)


def test_head_modes_of_the_stages():
    config = get_config("distill")
    config.ft_proj_selector = 1
    only_first = {"head_projection": {"layer_0": {}}}
    whole_head = {"head_projection": {"layer_0": {}, "layer_1": {}, "layer_2": {}}}
    assert head_mode_of(config, only_first) == "finetune"
    assert head_mode_of(config, whole_head) == "full"  # a converted release keeps it all
    config.stage = "pretrain"
    assert head_mode_of(config, whole_head) == "pretrain"


@needs_release
def test_release_converted_and_exported_gives_the_release_outputs(tmp_path):
    """The authors' SavedModel -> this project's workdir (convert) -> SavedModel (export): called the
    same way on the release's reference images, the export returns the release's outputs."""
    from simclrv2_jax.checkpoints import release

    release.convert_to_workdir(str(RELEASE), str(tmp_path / "run"), 0)
    info = export.export_saved_model(
        str(tmp_path / "run"), str(tmp_path / "out"), image_size=0, platforms=("cpu",)
    )
    assert info["head_mode"] == "full" and info["input_shape"] == [None, None, None, 3]
    assert not info["with_gradient"]
    loaded = tf.saved_model.load(str(tmp_path / "out"))
    reference = np.load(RELEASE / "reference.npz")
    images = reference["images"]  # 64 px, not the converted config's 224: any size is taken
    for mode, trainable in (("eval", False), ("train", True)):
        expected = {k.split("/", 1)[1]: reference[k] for k in reference.files if k.startswith(f"{mode}/")}
        actual = {k: v.numpy() for k, v in loaded(images, trainable=trainable).items()}
        # In training mode the last projection BN normalises over 4 examples, which amplifies float32
        # rounding differences between TF's and XLA's reductions (convert.py measures 5e-5 in Flax).
        assert_close(actual, expected, f"release, {mode}", tolerance=TOLERANCE if mode == "eval" else 5e-4)


def test_clear_errors(tmp_path, pretrain):
    run = pretrain["root"] / "run"
    with pytest.raises(ValueError, match="does not exist"):
        export.export_saved_model(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ValueError,
        match="No finished checkpoint under .*" + re.escape(str(tmp_path / "empty" / "checkpoints")),
    ):
        export.export_saved_model(str(tmp_path / "empty"), str(tmp_path / "out"))
    (tmp_path / "empty" / "config.json").write_text((run / "config.json").read_text())
    with pytest.raises(
        ValueError,
        match="No finished checkpoint under .*" + re.escape(str(tmp_path / "empty" / "checkpoints")),
    ):
        export.export_saved_model(str(tmp_path / "empty"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="already exists"):
        export.export_saved_model(str(run), str(pretrain["root"] / "saved_model"))
    assert not (tmp_path / "out").exists()


def test_command_line_reports_a_missing_checkpoint_in_one_line(tmp_path, jax_compile_cache):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"stage": "pretrain"}))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "simclrv2_jax.export",
            f"--workdir={tmp_path / 'run'}",
            f"--out={tmp_path / 'o'}",
        ],
        cwd=REPO,
        env=subprocess_env(jax_compile_cache),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: No finished checkpoint under {tmp_path / 'run'}" in proc.stderr
    assert "Traceback" not in proc.stderr
