"""config.microbatches: each device's share of the global batch in K micro-batches inside one step.

The references are independent of the micro-batch code: the same global batch on K times as many
devices with ``microbatches=1`` (the plain step, one BN group per device), the example order written
out by hand with NumPy indices, and, for resume, the uninterrupted run. With per-device BN one
device with K micro-batches must train exactly as K devices do (to float rounding: the sums run in
another order), in the loss, the gradients, the parameters, the BN statistics and the LARS state.

Each step is compared from the same state: step ``i`` of the run in micro-batches starts from the
reference's state after step ``i - 1``. Left to themselves the two runs part by more than rounding:
the float32 differences of one step (a few 1e-6 of a leaf's largest value) flip a few ReLUs of the
next step's batch, and the early layers' gradients of step 3 then differ by up to 4e-3 of their
largest value (measured on the unrolled form); from the same state they agree to 1e-6. The free
runs are still compared, at that looser tolerance (``FREE_RTOL``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_identical, flat, raise_at, read_checkpoint, record_steps, saved_steps, tiny

from simclrv2_jax.config import get_config
from simclrv2_jax.config.validation import validate
from simclrv2_jax.train import finetune, microbatches, parallel, pretrain, train_stage

BATCH = 32
STEPS = 3
# float32, sums in another order; LARS normalises each layer's step, so relative errors stay put.
RTOL, ATOL = 2e-5, 1e-6
FREE_RTOL = 2e-2  # two runs left to themselves for three steps (see the module docstring)


# ------------------------------------------------------------------------------------------------
# The layout by hand.


def test_split_and_join_by_hand():
    """Micro-batch k of device d holds slice k of device d's share; ``join`` puts them back."""
    devices, k, n = 2, 4, 16  # 8 examples per device, 2 per micro-batch
    x = np.arange(n * 3).reshape(n, 3)
    mb = microbatches.Microbatches(k, devices)
    parts = np.asarray(mb.split(jnp.asarray(x)))
    assert parts.shape == (k, n // k, 3)
    share = n // devices
    for j in range(k):
        rows = [d * share + j * (share // k) + i for d in range(devices) for i in range(share // k)]
        np.testing.assert_array_equal(parts[j], x[rows])
    np.testing.assert_array_equal(np.asarray(mb.join(jnp.asarray(parts))), x)
    # Joined outputs of micro-batches are ordered device-major, then micro-batch: group d * K + j.
    outs = np.arange(k * 4).reshape(k, 4)  # 4 rows per micro-batch, 2 per device
    joined = np.asarray(mb.join(jnp.asarray(outs)))
    np.testing.assert_array_equal(joined, [0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15])


def test_unmoved_statistics_stay_exactly():
    """BN in inference mode (frozen blocks) moves no statistic; the average of K copies is the copy."""
    start = {"mean": jnp.asarray([0.1, 1 / 3, 7.7], jnp.float32)}
    stacked = {"mean": jnp.stack([start["mean"]] * 3)}
    np.testing.assert_array_equal(microbatches.mean_update(start, stacked)["mean"], start["mean"])


# ------------------------------------------------------------------------------------------------
# Steps on sub-meshes, on fixed batches.


def recording(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner``, its state extended by the gradient it was last given (read back by the tests)."""

    def init(params):
        return inner.init(params), jax.tree_util.tree_map(jnp.zeros_like, params)

    def update(grads, state, params=None):
        updates, inner_state = inner.update(grads, state[0], params)
        return updates, (inner_state, grads)

    return optax.GradientTransformation(init, update)


def pretrain_config(data_dir, **overrides):
    fields = dict(
        train_steps=100,  # the schedule's first steps: a learning rate well above 0
        train_batch_size=BATCH,
        warmup_epochs=0.0,
        global_bn=False,
        augment_on_device=False,  # the test hands the step its views
        use_blur=False,
    )
    return tiny(get_config("pretrain", "fashion_mnist"), data_dir, **{**fields, **overrides})


def batches(views: int, steps: int = STEPS, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (BATCH, views, 16, 16, 3) if views > 1 else (BATCH, 16, 16, 3)
    return [
        {
            "image": rng.uniform(size=shape).astype(np.float32),
            "label": rng.integers(0, 10, size=BATCH).astype(np.int32),
            "mask": np.ones(BATCH, np.float32),
        }
        for _ in range(steps)
    ]


def run_steps(build, config, devices: int, views: int, steps: int = STEPS, start=None, free=False):
    """``(metrics per step, state after each step)`` of the stage's step on the first ``devices``.

    With ``start`` (another run's result) each step after the first starts from that run's state
    before it, so that each step is compared from the same state; ``free`` also returns the run left
    to itself from the initial state: ``(from start, free)``.
    """
    mesh = parallel.create_mesh(devices)
    task = build(config, mesh)
    task.tx = recording(task.tx)
    layout = parallel.ParamLayout(mesh, config.param_sharding, config.fsdp_min_size)
    abstract = jax.eval_shape(lambda: task.init_state(config.seed))
    sharding = layout.state_shardings(abstract)
    initial = jax.jit(lambda: task.init_state(config.seed), out_shardings=sharding)()
    data = parallel.data_sharding(mesh)
    step = jax.jit(
        task.make_train_step(layout),
        in_shardings=(sharding, data),
        out_shardings=(sharding, parallel.replicated(mesh)),
    )

    def run(starts):
        state, metrics, states = initial, [], []
        for i, batch in enumerate(batches(views, steps)):
            if starts is not None and i > 0:
                state = jax.device_put(starts[i - 1], sharding)
            state, m = step(state, jax.device_put(batch, data))
            metrics.append(jax.device_get(m))
            states.append(jax.tree_util.tree_map(np.asarray, jax.device_get(state)))
        return metrics, states

    if start is None:
        return run(None)
    forced = run(start[1])
    return (forced, run(None)) if free else forced


def assert_trees_close(got, want, what, rtol=RTOL):
    """Each leaf within ``rtol`` of the reference, measured against the leaf's largest magnitude
    (a gradient's small entries carry the rounding of its large ones)."""
    got, want = flat(got), flat(want)
    assert got.keys() == want.keys(), what
    for k, w in want.items():
        w = np.asarray(w, np.float64)
        scale = max(float(np.max(np.abs(w))) if w.size else 0.0, ATOL)
        np.testing.assert_allclose(got[k], w, rtol=rtol, atol=rtol * scale, err_msg=f"{what}{k}")


def assert_same_training(got, want, check_memory=False, rtol=RTOL):
    (got_metrics, got_states), (want_metrics, want_states) = got, want
    for step, (g, w) in enumerate(zip(got_metrics, want_metrics)):
        for name in ("loss", "contrast_loss", "sup_loss", "grad_norm", "weight_decay_loss"):
            if name in w:
                np.testing.assert_allclose(g[name], w[name], rtol=rtol, err_msg=f"step {step + 1} {name}")
        assert g["nonfinite"] == 0 and w["nonfinite"] == 0
    for step, (g, w) in enumerate(zip(got_states, want_states)):
        at = f"after step {step + 1}: "
        assert int(g.step) == int(w.step) == step + 1
        assert_trees_close(g.opt_state[1], w.opt_state[1], at + "gradients", rtol)
        assert_trees_close(g.params, w.params, at + "params", rtol)
        assert_trees_close(g.batch_stats, w.batch_stats, at + "batch_stats", rtol)
        assert_trees_close(g.opt_state[0], w.opt_state[0], at + "LARS state", rtol)
        if check_memory:
            assert_trees_close(g.memory, w.memory, at + "memory", rtol)


@pytest.fixture(scope="module")
def four_devices(fake_data_dir):
    """The reference: batch 32 on four devices, one BN group each, no micro-batches."""
    return run_steps(pretrain.build, pretrain_config(fake_data_dir), devices=4, views=2)


@pytest.fixture(params=["loop", "unrolled"])
def loop_form(request, monkeypatch):
    """The micro-batch loops as accelerators run them (``lax.scan`` loops), and unrolled as on the
    CPU backend (``microbatches.UNROLL_ON_CPU``): the same arithmetic either way."""
    monkeypatch.setattr(microbatches, "UNROLL_ON_CPU", request.param == "unrolled")
    return request.param


@pytest.fixture
def loops(monkeypatch):
    monkeypatch.setattr(microbatches, "UNROLL_ON_CPU", False)


def test_loop_form_follows_the_backend(monkeypatch):
    assert microbatches.Microbatches(4, 1).unroll == 4  # the tests run on the CPU backend
    monkeypatch.setattr(microbatches, "UNROLL_ON_CPU", False)
    assert microbatches.Microbatches(4, 1).unroll == 1


def test_one_device_in_four_microbatches_trains_as_four_devices(fake_data_dir, four_devices, loop_form):
    config = pretrain_config(fake_data_dir, microbatches=4)
    got, free = run_steps(pretrain.build, config, devices=1, views=2, start=four_devices, free=True)
    # The guard: the reference moves (the comparison could fail).
    first, last = flat(four_devices[1][0].params), flat(four_devices[1][-1].params)
    assert any(not np.allclose(first[k], last[k]) for k in first)
    assert_same_training(got, four_devices)
    assert_same_training(free, four_devices, rtol=FREE_RTOL)


def test_fsdp_in_microbatches_trains_as_replicated_devices(fake_data_dir, four_devices, loops):
    """Two devices, fsdp (kernels split), two micro-batches each = four replicated devices."""
    config = pretrain_config(fake_data_dir, microbatches=2, param_sharding="fsdp", fsdp_min_size=256)
    got = run_steps(pretrain.build, config, devices=2, views=2, start=four_devices)
    assert_same_training(got, four_devices)


@pytest.mark.slow
def test_scanned_rematerialised_fsdp_blocks_in_microbatches(fake_data_dir, loops):
    """scan_blocks and remat under fsdp, two devices x two micro-batches (weights gathered block by
    block in the loops) = the same model on four replicated devices without micro-batches."""
    model = dict(scan_blocks=True, remat=True)
    want = run_steps(pretrain.build, pretrain_config(fake_data_dir, **model), devices=4, views=2, steps=2)
    config = pretrain_config(fake_data_dir, microbatches=2, param_sharding="fsdp", fsdp_min_size=256, **model)
    got = run_steps(pretrain.build, config, devices=2, views=2, steps=2, start=want)
    assert any("_scan" in k for k in flat(got[1][0].params))
    assert_same_training(got, want)


@pytest.mark.slow
def test_memory_of_negatives_in_microbatches(fake_data_dir):
    """The whole global batch's keys enter the queue once per step, in the loss's row order, and the
    memory network's BN groups are the micro-batches: the queue, pointers and memory network as on
    four devices."""
    config = dict(memory_size=2 * BATCH * 2)  # two steps fill it, the third overwrites
    want = run_steps(pretrain.build, pretrain_config(fake_data_dir, **config), devices=4, views=2)
    got = run_steps(
        pretrain.build,
        pretrain_config(fake_data_dir, microbatches=2, **config),
        devices=2,
        views=2,
        start=want,
    )
    assert int(want[1][-1].memory["queue_filled"]) == 2 * BATCH * 2
    assert_same_training(got, want, check_memory=True)


def finetune_config(data_dir, **overrides):
    fields = dict(
        checkpoint="",  # the supervised baseline: the same step, from random weights
        label_fraction=1.0,
        train_steps=100,
        train_batch_size=BATCH,
        warmup_epochs=0.0,
        global_bn=False,
        augment_on_device=False,
    )
    return tiny(get_config("finetune", "fashion_mnist"), data_dir, **{**fields, **overrides})


def test_finetuning_in_microbatches_accumulates_as_more_devices(fake_data_dir):
    """Per-example loss: the micro-batches' gradients averaged = the gradient on four devices."""
    want = run_steps(finetune.build, finetune_config(fake_data_dir), devices=4, views=1, steps=2)
    got = run_steps(
        finetune.build,
        finetune_config(fake_data_dir, microbatches=4),
        devices=1,
        views=1,
        steps=2,
        start=want,
    )
    assert_same_training(got, want)


# ------------------------------------------------------------------------------------------------
# Errors and whole runs.


def test_batch_that_does_not_split_is_one_clear_error(fake_data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"config.microbatches=3 is invalid: train_batch_size=32"):
        validate(pretrain_config(fake_data_dir, microbatches=3))
    with pytest.raises(ValueError, match=r"config.microbatches=0 is invalid: must be positive"):
        validate(pretrain_config(fake_data_dir, microbatches=0))
    # 40 divides by 4 micro-batches, but not by 4 devices x 4 micro-batches: refused before compiling.
    config = pretrain_config(fake_data_dir, microbatches=4, train_batch_size=40)
    with pytest.raises(ValueError) as error:
        train_stage(config, str(tmp_path / "bad"), mesh=parallel.create_mesh(4))
    message = str(error.value)
    assert "config.train_batch_size=40 does not split into 4 device(s) x config.microbatches=4" in message
    assert "--config.train_batch_size=32 or 48" in message
    assert "--config.microbatches=2" in message  # 10 examples per device: 2 micro-batches of 5
    assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.slow
def test_resume_with_microbatches_is_bit_for_bit(fake_data_dir, tmp_path):
    """Two devices, two micro-batches each, with the memory of negatives: stopped after step 2 and
    resumed, the run ends bit for bit where the uninterrupted run ends."""
    n = 4

    def config():
        return tiny(
            get_config("pretrain", "fashion_mnist"),
            fake_data_dir,
            train_steps=n,
            microbatches=2,
            memory_size=64,
        )

    mesh = parallel.create_mesh(2)
    straight = train_stage(config(), str(tmp_path / "straight"), mesh=mesh)
    workdir = str(tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        train_stage(config(), workdir, mesh=mesh, step_hooks=[raise_at(2, KeyboardInterrupt())])
    assert saved_steps(workdir) == [2]
    seen = []
    resumed = train_stage(config(), workdir, mesh=mesh, step_hooks=[record_steps(seen)])
    assert seen == [3, 4] and resumed["final_step"] == n
    parts = ("params", "batch_stats", "opt_state", "rng", "step", "memory")
    assert_identical(resumed["state"], straight["state"], parts, "resumed vs uninterrupted")
    assert_identical(
        read_checkpoint(workdir, n), read_checkpoint(tmp_path / "straight", n), parts, "checkpoints"
    )
