"""The MoCo-style memory of negatives (train/memory.py) against NumPy and hand counts.

* the loss with a queue against a NumPy NT-Xent written anchor by anchor (both directions,
  temperature, empty slots left out), and its exact reduction to the memory-free loss;
* the ring buffer against a slot-by-slot NumPy simulation, wrapping inside a step;
* the memory network's moving average against NumPy, from a real run's snapshots;
* runs: the first step equals the memory-free run's (the queue starts empty), the queue's pointers
  by hand count, a stopped and resumed run bit for bit, and the fsdp layout against the replicated
  one to float tolerance.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PRETRAIN_STEPS, flat, host_copy, read_checkpoint, tiny

from simclrv2_jax.config import get_config
from simclrv2_jax.train import losses, train_stage
from simclrv2_jax.train.memory import MomentumMemory

N = PRETRAIN_STEPS  # 6 steps, as the shared memory-free run
BATCH = 16  # conftest.tiny's global batch: 32 projections a step
SLOTS = 48  # not a multiple of 32: the second step's write wraps around the end
MOMENTUM = 0.9  # far from 1, so that the memory network visibly lags the encoder in 6 steps


# ------------------------------------------------------------------------------------------------
# NumPy references.


def np_normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def np_nt_xent(z, tau, queue=None, valid=None, hidden_norm=True):
    """Mean over the N examples of loss_a + loss_b; every anchor's softmax runs over its positive, the
    2N - 2 other examples of both views, and the filled queue slots."""
    z = np.asarray(z, np.float64)
    if hidden_norm:
        z = np_normalize(z)
    n = len(z) // 2
    views = (z[:n], z[n:])
    negatives_q = np.zeros((0, z.shape[1])) if queue is None else np.asarray(queue, np.float64)
    if queue is not None and valid is not None:
        negatives_q = negatives_q[np.asarray(valid)]
    total = 0.0
    for anchors, partners in (views, views[::-1]):
        for i in range(n):
            pos = anchors[i] @ partners[i] / tau
            others = [partners[j] for j in range(n) if j != i] + [anchors[j] for j in range(n) if j != i]
            logits = (
                [pos] + [anchors[i] @ o / tau for o in others] + [anchors[i] @ q / tau for q in negatives_q]
            )
            m = max(logits)
            total += m + np.log(np.sum(np.exp(np.asarray(logits) - m))) - pos
    return total / n


def np_ring(size, dim, batches):
    """The queue slot by slot: each row of each batch into the next slot, oldest overwritten."""
    queue, ptr, filled = np.zeros((size, dim), np.float32), 0, 0
    for rows in batches:
        for row in rows:
            queue[ptr] = row
            ptr = (ptr + 1) % size
            filled = min(filled + 1, size)
    return queue, ptr, filled


# ------------------------------------------------------------------------------------------------
# The loss.


@pytest.mark.parametrize("hidden_norm", [True, False])
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_loss_with_memory_matches_numpy(tau, hidden_norm):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(8, 5)).astype(np.float32)
    queue = np_normalize(rng.normal(size=(6, 5))).astype(np.float32)
    valid = np.array([True, True, True, False, True, False])
    if not hidden_norm:
        z = z * 0.3  # unnormalised rows: keep the logits moderate
    loss, _ = losses.nt_xent_loss(
        jnp.asarray(z),
        temperature=tau,
        hidden_norm=hidden_norm,
        memory=jnp.asarray(queue),
        memory_valid=jnp.asarray(valid),
    )
    expected = np_nt_xent(z, tau, queue, valid, hidden_norm=hidden_norm)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
    # The queue adds negatives: the loss is above the memory-free one.
    assert expected > np_nt_xent(z, tau, hidden_norm=hidden_norm) + 1e-3


def test_every_slot_counts_without_a_mask():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(6, 4)).astype(np.float32)
    queue = np_normalize(rng.normal(size=(5, 4))).astype(np.float32)
    loss, _ = losses.nt_xent_loss(jnp.asarray(z), temperature=0.2, memory=jnp.asarray(queue))
    np.testing.assert_allclose(float(loss), np_nt_xent(z, 0.2, queue), rtol=2e-5)


def test_empty_memory_is_exactly_the_loss_without_memory():
    rng = np.random.default_rng(2)
    z = jnp.asarray(rng.normal(size=(8, 5)).astype(np.float32))
    queue = jnp.asarray(np_normalize(rng.normal(size=(7, 5))).astype(np.float32))
    without, aux_without = losses.nt_xent_loss(z, temperature=0.5)
    empty, aux_empty = losses.nt_xent_loss(z, temperature=0.5, memory=queue, memory_valid=jnp.zeros(7, bool))
    np.testing.assert_allclose(float(empty), float(without), rtol=1e-6)
    np.testing.assert_allclose(float(without), np_nt_xent(np.asarray(z), 0.5), rtol=2e-5)
    for key in aux_without:
        np.testing.assert_allclose(float(aux_empty[key]), float(aux_without[key]), rtol=1e-6)


def test_no_gradient_reaches_the_memory():
    rng = np.random.default_rng(3)
    z = jnp.asarray(rng.normal(size=(4, 3)).astype(np.float32))
    queue = jnp.asarray(np_normalize(rng.normal(size=(4, 3))).astype(np.float32))
    g_queue = jax.grad(lambda q: losses.nt_xent_loss(z, temperature=0.5, memory=q)[0])(queue)
    assert np.all(np.asarray(g_queue) == 0)
    # The anchors' gradient does see the queue: it differs from the memory-free gradient.
    g_with = jax.grad(lambda x: losses.nt_xent_loss(x, temperature=0.5, memory=queue)[0])(z)
    g_without = jax.grad(lambda x: losses.nt_xent_loss(x, temperature=0.5)[0])(z)
    assert not np.allclose(np.asarray(g_with), np.asarray(g_without), atol=1e-4)


# ------------------------------------------------------------------------------------------------
# The queue and the memory network, one call at a time.


def test_push_is_a_ring_buffer_in_row_order():
    memory = MomentumMemory(size=10, momentum=0.9, key_dim=3, hidden_norm=True, keys_of=lambda o: o)
    state = {"queue": jnp.zeros((10, 3)), "queue_ptr": jnp.int32(0), "queue_filled": jnp.int32(0)}
    rng = np.random.default_rng(4)
    batches = [rng.normal(size=(4, 3)).astype(np.float32) for _ in range(4)]  # 16 rows: wraps at 10
    for i, rows in enumerate(batches):
        state = jax.jit(memory.push)(state, jnp.asarray(rows))
        queue, ptr, filled = np_ring(10, 3, batches[: i + 1])
        np.testing.assert_array_equal(np.asarray(state["queue"]), queue)
        assert int(state["queue_ptr"]) == ptr and int(state["queue_filled"]) == filled
        np.testing.assert_array_equal(
            np.asarray(memory.valid(state)), np.arange(10) < filled
        )  # filled slots, by hand: 4, 8, 10, 10
    assert [min(4 * (i + 1), 10) for i in range(4)] == [4, 8, 10, 10]
    with pytest.raises(ValueError, match="memory_size=10 is smaller than the 12"):
        memory.push(state, jnp.zeros((12, 3)))


def test_advance_moves_the_memory_network_then_projects_with_it():
    import flax.linen as nn

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.Dense(6)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            return {"proj_head_output": nn.Dense(3)(x)}

    model = Tiny()
    x = jnp.asarray(np.random.default_rng(5).normal(size=(8, 4)).astype(np.float32))
    old = model.init(jax.random.key(0), x, train=False)
    online = model.init(jax.random.key(1), x, train=False)["params"]
    memory = MomentumMemory(
        size=16, momentum=0.75, key_dim=3, hidden_norm=True, keys_of=lambda o: o["proj_head_output"]
    )
    state = memory.init(old)
    moved, keys = memory.advance(model, state, online, x)
    expected = jax.tree_util.tree_map(
        lambda e, p: 0.75 * np.asarray(e, np.float64) + 0.25 * np.asarray(p, np.float64),
        old["params"],
        online,
    )
    for k, v in flat(expected).items():
        np.testing.assert_allclose(flat(moved["params"])[k], v, rtol=1e-6, atol=1e-7)
    out, updates = model.apply(
        {"params": jax.tree_util.tree_map(jnp.asarray, expected), "batch_stats": old["batch_stats"]},
        x,
        train=True,
        mutable=["batch_stats"],
    )
    np.testing.assert_allclose(
        np.asarray(keys), np_normalize(np.asarray(out["proj_head_output"], np.float64)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(np.linalg.norm(np.asarray(keys), axis=1), 1.0, rtol=1e-6)
    for k, v in flat(updates["batch_stats"]).items():  # its own moving statistics, from this batch
        np.testing.assert_allclose(flat(moved["batch_stats"])[k], v, rtol=1e-5)
    assert int(moved["queue_filled"]) == 0  # advancing writes nothing; push does


# ------------------------------------------------------------------------------------------------
# Whole runs.


def memory_config(data_dir, **overrides):
    overrides = {"memory_size": SLOTS, "moco_momentum": MOMENTUM, **overrides}
    return tiny(get_config("pretrain", "fashion_mnist"), data_dir, train_steps=N, **overrides)


@pytest.fixture(scope="module")
def memory_run(tmp_path_factory, fake_data_dir):
    workdir = tmp_path_factory.mktemp("memory") / "straight"
    snapshots = {}
    results = train_stage(
        memory_config(fake_data_dir),
        str(workdir),
        step_hooks=[lambda step, state: snapshots.__setitem__(step, host_copy(state))],
    )
    return {"workdir": workdir, "results": results, "snapshots": snapshots}


@pytest.mark.slow
def test_first_step_is_the_memory_free_step(memory_run, pretrain_run):
    """The queue starts empty, so step 1 is exactly NT-Xent without memory (same data, same draws)."""
    with_memory, without = memory_run["snapshots"][1], pretrain_run["snapshots"][1]
    for name in ("params", "batch_stats"):
        a, b = flat(getattr(with_memory, name)), flat(getattr(without, name))
        assert a.keys() == b.keys()
        for k in b:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=f"{name}{k}")
    # From step 2 on the queue's negatives change the updates.
    later = flat(memory_run["snapshots"][3].params)
    free = flat(pretrain_run["snapshots"][3].params)
    assert any(not np.allclose(later[k], free[k], rtol=1e-4) for k in free)


@pytest.mark.slow
def test_queue_pointers_and_moving_average_in_a_run(memory_run):
    snapshots = memory_run["snapshots"]
    for step in range(1, N + 1):
        memory = snapshots[step].memory
        written = 2 * BATCH * step  # 32 projections a step
        assert int(memory["queue_ptr"]) == written % SLOTS  # 32, 16, 0, 32, 16, 0
        assert int(memory["queue_filled"]) == min(written, SLOTS)  # 32, 48, 48, ...
        filled_rows = np.asarray(memory["queue"])[: min(written, SLOTS)]
        np.testing.assert_allclose(np.linalg.norm(filled_rows, axis=1), 1.0, rtol=1e-5)  # hidden_norm
    assert np.all(np.asarray(snapshots[1].memory["queue"])[32:] == 0)  # not yet written
    for step in range(2, N + 1):
        before, after = snapshots[step - 1], snapshots[step]
        expected = jax.tree_util.tree_map(
            lambda e, p: MOMENTUM * np.asarray(e, np.float64) + (1 - MOMENTUM) * np.asarray(p, np.float64),
            before.memory["params"],
            before.params,
        )
        got = flat(after.memory["params"])
        for k, v in flat(expected).items():
            np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    final = memory_run["results"]["state"]
    lag = [
        not np.allclose(e, p, rtol=1e-3)
        for e, p in zip(flat(final.memory["params"]).values(), flat(final.params).values())
    ]
    assert sum(lag) > len(lag) // 2  # the memory network lags the encoder


@pytest.mark.slow
def test_resume_with_memory_is_bit_for_bit(tmp_path, fake_data_dir, memory_run):
    workdir = str(tmp_path / "stopped")

    def stop_at_3(step, state):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_stage(memory_config(fake_data_dir), workdir, step_hooks=[stop_at_3])
    saved = read_checkpoint(workdir, 3)
    assert int(saved["memory"]["queue_ptr"]) == 96 % SLOTS and int(saved["memory"]["queue_filled"]) == SLOTS
    resumed = train_stage(memory_config(fake_data_dir), workdir)
    assert resumed["steps_this_run"] == N - 3
    got, want = flat(resumed["state"]), flat(memory_run["results"]["state"])
    assert got.keys() == want.keys() and any(".memory" in k for k in want)
    different = [k for k in want if not np.array_equal(got[k], want[k])]
    assert not different, f"resumed run differs in {different[:4]}"
    on_disk, straight = flat(read_checkpoint(workdir, N)), flat(read_checkpoint(memory_run["workdir"], N))
    assert on_disk.keys() == straight.keys()
    assert all(np.array_equal(on_disk[k], straight[k]) for k in straight)


@pytest.mark.slow
def test_memory_network_is_laid_out_like_the_parameters(tmp_path, fake_data_dir, memory_run):
    """fsdp against replicated, both on the 8 devices: the memory network's weights are split like the
    encoder's, the queue is whole, and every part of the state agrees with the replicated run.

    Same device count on purpose: the per-device convolution shapes, hence the CPU convolution paths
    measured for them, are then the same in both runs. With another device count the paths may differ,
    and six steps of this tiny model at its learning rate amplify that float rounding past any tight
    tolerance (``test_fsdp.py`` compares across device counts with a looser one)."""
    results = train_stage(
        memory_config(fake_data_dir, param_sharding="fsdp", fsdp_min_size=256), str(tmp_path / "fsdp")
    )
    state = results["state"]
    assert len(state.memory["queue"].sharding.device_set) == 8
    encoder = dict(jax.tree_util.tree_leaves_with_path(state.params))
    split = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.memory["params"]):
        shard = leaf.sharding.shard_shape(leaf.shape)
        assert shard == encoder[path].sharding.shard_shape(leaf.shape), jax.tree_util.keystr(path)
        if shard != leaf.shape:
            split += 1
            assert leaf.size >= 256
    assert split, "no memory-network weight is split under fsdp"
    assert state.memory["queue"].sharding.shard_shape(state.memory["queue"].shape) == (SLOTS, 16)
    got, want = flat(state), flat(memory_run["results"]["state"])
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-4, atol=2e-5, err_msg=k)


# ------------------------------------------------------------------------------------------------
# Configuration.


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"memory_size": 16}, "memory_size"),  # fewer slots than one step's 32 projections
        ({"memory_size": -1}, "memory_size"),
        ({"memory_size": 64, "moco_momentum": 1.5}, "moco_momentum"),
        ({"memory_size": 64, "proj_head_mode": "none"}, "memory_size"),
    ],
)
def test_bad_memory_settings_are_one_clear_error(overrides, field, fake_data_dir, tmp_path):
    config = tiny(get_config("pretrain", "fashion_mnist"), fake_data_dir, train_steps=1, **overrides)
    with pytest.raises(ValueError, match=rf"config\.{field}="):
        train_stage(config, str(tmp_path / "bad"))
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_memory_is_off_by_default_and_the_state_has_none():
    config = get_config("pretrain", "imagenet")
    assert config.memory_size == 0 and config.moco_momentum == 0.999
