"""Shared test set-up: 8 virtual CPU devices, TensorFlow kept off accelerators, and the fixtures and
helpers every test module uses (fake Fashion-MNIST IDX files, tiny stage configs, the session's
compilation cache and shared pretraining run, NumPy metrics, checkpoint readers and comparisons).

The IDX writer follows the format's description (two zero bytes, the type code 0x08 for unsigned
bytes, the number of dimensions, then each dimension as a big-endian uint32), not the library's reader.
Test modules import the helpers with ``from conftest import ...``; no test module imports another.
"""

import gzip
import json
import os

# Must happen before JAX is imported anywhere in the test session (see ``xla_flags``).
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 "
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np
import pytest
import tensorflow as tf

tf.config.set_visible_devices([], "GPU")

# Compiling dominates these tests (tiny models, a few steps): XLA's CPU backend compiles them about
# a quarter faster without LLVM's optimisation passes, which change how fast the code runs, not what
# it computes (IEEE arithmetic either way: XLA's CPU fast-math is off). The session and the tests'
# subprocesses run with these flags and their device count.
QUICK_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices: int) -> str:
    return f"--xla_force_host_platform_device_count={devices} {QUICK_XLA}"


IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
NUM_CLASSES = 10


def write_idx(path, array):
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def write_fake_fashion_mnist(directory, n_train=200, n_test=40, size=28, seed=0):
    """Writes the four IDX files; ``n_train // 10`` training images per class (balanced)."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    data = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.uint8)
        # Class-dependent brightness so the labels are learnable, plus noise.
        base = (labels.astype(np.float32) * 20.0 + 30.0)[:, None, None]
        images = np.clip(base + rng.normal(0, 40, size=(n, size, size)), 0, 255).astype(np.uint8)
        write_idx(os.path.join(directory, IDX_FILES[split][0]), images)
        write_idx(os.path.join(directory, IDX_FILES[split][1]), labels)
        data[split] = (images, labels)
    return data


TINY_MODEL = {"resnet_depth": 18, "width_multiplier": 0.125, "image_size": 16, "proj_out_dim": 16}
# Pretraining of the tiny model at a fixed, moderate setting, whatever the default job's preset says:
# the tests compare runs across layouts, device counts and processes, and the rounding differences
# between them grow step by step faster at a larger learning rate or a lower temperature.
TINY_PRETRAIN = {"learning_rate": 1.0, "temperature": 0.5, "crop_min_area": 0.08}


def tiny(config, data_dir, *, train_steps, checkpoint_steps=1000, **overrides):
    """Makes a stage config tiny: small ResNet-18, 16 px, batch 16, eval batch 40; pretraining at
    ``TINY_PRETRAIN`` and without its k-NN monitor (compiling it costs more than a tiny run), unless
    ``knn_monitor=True``."""
    for key, value in TINY_MODEL.items():
        config[key] = value
    if "knn_monitor" in config:  # a pretraining config
        config.knn_monitor = False
        for key, value in TINY_PRETRAIN.items():
            config[key] = value
    config.data_dir = str(data_dir)
    config.train_batch_size = 16
    config.eval_batch_size = 40
    config.log_every_steps = 1
    config.checkpoint_steps = checkpoint_steps
    config.train_steps = train_steps
    for key, value in overrides.items():
        config[key] = value
    return config


# ------------------------------------------------------------------------------------------------
# Evaluation counted in NumPy: the test split read from its IDX file, metrics from the logits.


def read_idx_gz(path):
    """An IDX file by its header: magic (2 zero bytes, type, ndim), then big-endian uint32 sizes."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int(n) for n in np.frombuffer(raw[4 : 4 + 4 * ndim], ">u4"))
    return np.frombuffer(raw[4 + 4 * ndim :], np.uint8).reshape(shape)


def split_images(data_dir):
    images = read_idx_gz(os.path.join(data_dir, "t10k-images-idx3-ubyte.gz"))
    labels = read_idx_gz(os.path.join(data_dir, "t10k-labels-idx1-ubyte.gz")).astype(np.int64)
    return np.repeat(images[..., None], 3, axis=-1), labels


def numpy_metrics(logits, labels):
    logits = np.asarray(logits, np.float64)
    order = np.argsort(-logits, axis=-1)
    rank = np.argmax(order == labels[:, None], axis=-1)  # 0 = the top prediction
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return {
        "top1": float(np.mean(rank == 0)),
        "top5": float(np.mean(rank < 5)),
        "loss": float(-np.mean(log_probs[np.arange(len(labels)), labels])),
    }


# ------------------------------------------------------------------------------------------------
# Session fixtures: the data, the compilation cache and the shared pretraining run are made once per
# session (per xdist worker), whichever of the modules run.

PRETRAIN_STEPS = 6


# JAX's persistent compilation cache for the whole suite, shared by the pytest workers, the command-line
# tests' subprocesses and, on one machine, later runs of the suite (tests/.jax_cache, ignored by git): a
# program compiled once (the tiny ResNet's steps, compiled by many tests) is loaded after that.
# SIMCLR_TEST_COMPILE_CACHE moves it.
COMPILE_CACHE = os.environ.get(
    "SIMCLR_TEST_COMPILE_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".jax_cache")
)


@pytest.fixture(scope="session", autouse=True)
def jax_compile_cache():
    """The persistent compilation cache for every test (see ``COMPILE_CACHE``): a resumed run, a
    later stage or another test with the same programs loads the executables compiled before instead
    of compiling again; compiling dominates these tests on 2 CPU cores. It caches XLA's output only
    and changes no result."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    previous = {name: getattr(jax.config, name) for name in names}
    path = COMPILE_CACHE
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.set_cache_dir(path)
    compilation_cache.reset_cache()
    yield path
    for name, value in previous.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="session")
def fake_data_dir(tmp_path_factory):
    """200 train / 40 test 28x28 images, 20 (train) and 4 (test) per class."""
    directory = tmp_path_factory.getbasetemp() / "fake_fashion_mnist"
    write_fake_fashion_mnist(directory)
    return directory


def subprocess_env(compile_cache):
    """Environment of a command-line test's subprocess: the CPU, 8 virtual devices and the session's
    compilation cache (used from the first compile on)."""
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=xla_flags(8),
        JAX_COMPILATION_CACHE_DIR=compile_cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )


def host_copy(state):
    import jax

    return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), state)


@pytest.fixture(scope="session")
def pretrain_run(tmp_path_factory, fake_data_dir, jax_compile_cache):
    """One uninterrupted tiny pretraining run of ``PRETRAIN_STEPS`` steps on all 8 devices.

    Returns ``dict(workdir, config, results, snapshots)``; ``snapshots[s]`` is a host copy of the
    state after step ``s`` (taken by a step hook), for comparison with checkpoints of other runs.
    """
    from simclrv2_jax.config import get_config
    from simclrv2_jax.train import train_stage

    workdir = tmp_path_factory.getbasetemp() / "pretrain_uninterrupted"
    config = tiny(
        get_config("pretrain", "fashion_mnist"), fake_data_dir, train_steps=PRETRAIN_STEPS, knn_monitor=True
    )
    snapshots = {}

    def snapshot(step, state):
        snapshots[step] = host_copy(state)

    results = train_stage(config, str(workdir), step_hooks=[snapshot])
    return {"workdir": workdir, "config": config, "results": results, "snapshots": snapshots}


# ------------------------------------------------------------------------------------------------
# Reading checkpoints back with Orbax directly (not through simclrv2_jax.checkpoints).


def read_checkpoint(workdir, step=None):
    """The saved TrainState pytree of ``workdir`` at ``step`` (default: the highest), as NumPy arrays."""
    import jax
    import orbax.checkpoint as ocp

    root = os.path.join(str(workdir), "checkpoints")
    if step is None:
        step = max(int(name) for name in os.listdir(root) if name.isdigit())
    path = os.path.join(root, str(step), "state")
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata.tree
        as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def flat(tree):
    """``{'['params']['backbone']...': array}`` for every leaf."""
    import jax

    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def assert_states_close(state, reference, *, rtol, atol, parts=("params", "batch_stats", "opt_state")):
    """Every leaf of ``parts`` of two TrainStates allclose, and the same leaves on both sides."""
    for part in parts:
        got, want = flat(getattr(state, part)), flat(getattr(reference, part))
        assert got.keys() == want.keys(), part
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=f"{part}{k}")


MARKER = -3.25  # exactly representable; no trained or initialised weight equals it everywhere


def marked_state(task, mesh):
    """A TrainState of the task's exact structure, shapes and dtypes (from ``jax.eval_shape`` of its
    initialiser) with every float leaf set to ``MARKER`` and integer leaves to 0, replicated over
    ``mesh``. Handing it to ``task.initialize`` shows exactly which leaves were restored: each one
    either equals the checkpoint or still holds the marker. Nothing is compiled."""
    import jax

    from simclrv2_jax.train import parallel

    abstract = jax.eval_shape(lambda: task.init_state(task.config.seed))
    rep = parallel.replicated(mesh)

    def fill(leaf):
        value = MARKER if np.issubdtype(leaf.dtype, np.floating) else 0
        return jax.device_put(np.full(leaf.shape, value, leaf.dtype), rep)

    return jax.tree_util.tree_map(fill, abstract)


# ------------------------------------------------------------------------------------------------
# Comparing runs and their checkpoints.

STATE_PARTS = ("params", "batch_stats", "opt_state", "rng", "step")


def part(state, name):
    return state[name] if isinstance(state, dict) else getattr(state, name)


def assert_identical(actual, expected, parts, what):
    """Every leaf of the named parts has the same shape, dtype and bits."""
    for name in parts:
        a, e = flat(part(actual, name)), flat(part(expected, name))
        assert a.keys() == e.keys(), f"{what}: {name} has different leaves"
        assert a, f"{what}: {name} is empty"
        different = [
            k
            for k in e
            if a[k].shape != e[k].shape or a[k].dtype != e[k].dtype or not np.array_equal(a[k], e[k])
        ]
        assert not different, f"{what}: {name} differs in {len(different)} leaves, e.g. {different[:3]}"


def saved_steps(workdir):
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def train_rows(workdir):
    with open(os.path.join(workdir, "history.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["step"] for r in rows if any(k.startswith("train/") for k in r)]


def raise_at(step, exception):
    def hook(s, state):
        if s == step:
            raise exception

    return hook


def record_steps(seen):
    return lambda s, state: seen.append(s)


def truncate_largest_data_file(step_dir):
    """Damages a checkpoint: its largest array file cut to half its size."""
    files = [
        os.path.join(root, name)
        for root, _, names in os.walk(os.path.join(step_dir, "state"))
        for name in names
        if "/d" in root
    ]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)
