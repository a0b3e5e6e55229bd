"""Resume: a pretraining run stopped after step k and restarted in the same workdir ends at step n
with the same parameters, BN statistics and optimiser state, bit for bit, as an uninterrupted run.

All runs use the default mesh (the 8 virtual CPU devices of conftest) and the tiny config of
``conftest.tiny``; the uninterrupted run is the session's shared ``pretrain_run``.
"""

import json
import os
import time

import jax
import numpy as np
import pytest
from conftest import PRETRAIN_STEPS, flat, read_checkpoint, tiny

from simclrv2_jax.config import get_config
from simclrv2_jax.train import train_stage

# Whole runs, subprocesses or processes: left out of the fast loop (launch/test.sh --fast).
pytestmark = pytest.mark.slow


N = PRETRAIN_STEPS  # 6
STATE_PARTS = ("params", "batch_stats", "opt_state", "rng", "step")


def config(data_dir, **overrides):
    return tiny(get_config("pretrain", "fashion_mnist"), data_dir, train_steps=N, **overrides)


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


def test_uninterrupted_run_moves_every_part(pretrain_run):
    """Guard: the comparisons below could fail, since training changes every part of the state."""
    results, snapshots = pretrain_run["results"], pretrain_run["snapshots"]
    assert results["final_step"] == N and sorted(snapshots) == list(range(1, N + 1))
    final = results["state"]
    for name in ("params", "batch_stats", "opt_state"):
        early, late = flat(getattr(snapshots[2], name)), flat(getattr(final, name))
        moved = [k for k in late if late[k].dtype.kind == "f" and not np.array_equal(early[k], late[k])]
        floats = [k for k in late if late[k].dtype.kind == "f"]
        # Every float leaf moves between step 2 and step 6 (momentum traces, BN statistics, weights).
        assert moved == floats, f"{name}: {sorted(set(floats) - set(moved))[:3]} did not change"
    assert int(final.step) == N
    assert saved_steps(pretrain_run["workdir"]) == [N]


def test_interrupted_run_saves_then_resumes_bit_for_bit(tmp_path, fake_data_dir, pretrain_run):
    workdir = str(tmp_path / "interrupted")
    with pytest.raises(KeyboardInterrupt):
        train_stage(config(fake_data_dir), workdir, step_hooks=[raise_at(2, KeyboardInterrupt())])

    # The stop lost nothing: a checkpoint of step 2 is on disk and holds the state after step 2.
    assert saved_steps(workdir) == [2]
    saved = read_checkpoint(workdir, 2)
    assert int(saved["step"]) == 2
    assert_identical(
        saved,
        pretrain_run["snapshots"][2],
        ("params", "batch_stats", "rng"),
        "checkpoint of step 2 vs the uninterrupted run after step 2",
    )

    seen = []
    results = train_stage(config(fake_data_dir), workdir, step_hooks=[record_steps(seen)])
    assert seen == [3, 4, 5, 6]  # continued from step 2, nothing repeated
    assert results["final_step"] == N and results["steps_this_run"] == 4
    assert_identical(
        results["state"],
        pretrain_run["results"]["state"],
        STATE_PARTS,
        "resumed after Ctrl-C vs uninterrupted (in memory)",
    )
    assert_identical(
        read_checkpoint(workdir, N),
        read_checkpoint(pretrain_run["workdir"], N),
        STATE_PARTS,
        "resumed after Ctrl-C vs uninterrupted (checkpoints on disk)",
    )
    assert train_rows(workdir) == list(range(1, N + 1))


def wait_for_checkpoint(workdir, step, timeout=120.0):
    """The save of ``step`` is committed before the exception leaves the loop; check it is on disk
    (with a timeout, so a regression fails here instead of hanging)."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    deadline = time.time() + timeout
    while not os.path.isdir(path):
        assert time.time() < deadline, f"the checkpoint of step {step} never appeared in {workdir}"
        time.sleep(0.2)


def test_crash_resumes_from_last_periodic_checkpoint(tmp_path, fake_data_dir, pretrain_run):
    workdir = str(tmp_path / "crashed")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_stage(
            config(fake_data_dir, checkpoint_steps=4),
            workdir,
            step_hooks=[raise_at(5, RuntimeError("simulated crash at step 5"))],
        )
    wait_for_checkpoint(workdir, 4)
    # Only the periodic save exists: an ordinary exception saves nothing of its own.
    assert saved_steps(workdir) == [4]
    assert_identical(
        read_checkpoint(workdir, 4),
        pretrain_run["snapshots"][4],
        ("params", "batch_stats", "rng"),
        "checkpoint of step 4 vs the uninterrupted run after step 4",
    )

    seen = []
    results = train_stage(config(fake_data_dir, checkpoint_steps=4), workdir, step_hooks=[record_steps(seen)])
    assert seen == [5, 6]  # resumed from step 4: step 5 is redone, steps 1-4 are not
    assert results["final_step"] == N and results["steps_this_run"] == 2
    assert_identical(
        results["state"],
        pretrain_run["results"]["state"],
        STATE_PARTS,
        "resumed after a crash vs uninterrupted (in memory)",
    )
    assert_identical(
        read_checkpoint(workdir, N),
        read_checkpoint(pretrain_run["workdir"], N),
        STATE_PARTS,
        "resumed after a crash vs uninterrupted (checkpoints on disk)",
    )
    # The crashed run had logged step 5; the resumed run logs it once more, not twice.
    assert train_rows(workdir) == list(range(1, N + 1))


def test_crash_leaves_no_checkpoint_half_written(tmp_path, fake_data_dir, pretrain_run):
    workdir = str(tmp_path / "crashed_while_saving")
    with pytest.raises(RuntimeError, match="simulated crash"):
        # The hook runs right after the loop has started the periodic save of step 4.
        train_stage(
            config(fake_data_dir, checkpoint_steps=4),
            workdir,
            step_hooks=[raise_at(4, RuntimeError("simulated crash at step 4"))],
        )
    try:
        left = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
        assert left == ["4"], f"when train_stage raised, checkpoints/ held {left}"
    finally:
        wait_for_checkpoint(workdir, 4)  # let the background save end before the next test


def test_relative_workdir_checkpoints_and_resumes(tmp_path, monkeypatch):
    # Orbax refuses relative paths; users type them (--workdir=runs/x).
    import jax.numpy as jnp

    from simclrv2_jax.checkpoints import Checkpointer, SavedRun

    monkeypatch.chdir(tmp_path)
    state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "batch_stats": {"m": jnp.ones(3)}}
    checkpointer = Checkpointer("runs/rel", max_to_keep=2)
    checkpointer.save(3, state, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()
    assert (tmp_path / "runs" / "rel" / "checkpoints" / "3" / "state").is_dir()
    restored, step = SavedRun("runs/rel").load_variables(
        state, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
    )
    assert step == 3
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.arange(6.0).reshape(2, 3))


def test_host_augmentation_resumes_bit_for_bit(tmp_path, fake_data_dir, pretrain_run):
    """The other input path: tf.data augmenting on the host (the default on the CPU backend for
    in-memory data is the device, which the tests above use). A run stopped after step 3 and resumed
    ends where an uninterrupted run does, bit for bit."""
    assert pretrain_run["results"]["augment_on_device"]  # what the tests above covered
    straight_dir, stopped_dir = str(tmp_path / "straight"), str(tmp_path / "stopped")
    straight = train_stage(config(fake_data_dir, augment_on_device=False), straight_dir)
    assert not straight["augment_on_device"] and straight["final_step"] == N
    # Another input path, so another run: guards against comparing with the device-augmented run.
    device = flat(pretrain_run["results"]["state"].params)
    assert any(not np.array_equal(v, device[k]) for k, v in flat(straight["state"].params).items())

    with pytest.raises(KeyboardInterrupt):
        train_stage(
            config(fake_data_dir, augment_on_device=False),
            stopped_dir,
            step_hooks=[raise_at(3, KeyboardInterrupt())],
        )
    seen = []
    resumed = train_stage(
        config(fake_data_dir, augment_on_device=False), stopped_dir, step_hooks=[record_steps(seen)]
    )
    assert seen == [4, 5, 6]
    assert_identical(
        resumed["state"], straight["state"], STATE_PARTS, "host augmentation: resumed vs uninterrupted"
    )
