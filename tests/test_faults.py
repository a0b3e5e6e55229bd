"""Nothing silently wrong, nothing lost: divergence, interrupts, config changes on resume, damaged
checkpoints, concurrent runs and unusable workdirs.

Each group below is one of the ways a run used to go wrong: the test states what a user sees now.
Runs are the tiny pretraining config of ``conftest.tiny`` (6 steps); "identical" means every leaf of
the state has the same bits as the session's uninterrupted ``pretrain_run``.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    PRETRAIN_STEPS,
    STATE_PARTS,
    assert_identical,
    flat,
    read_checkpoint,
    record_steps,
    saved_steps,
    subprocess_env,
    tiny,
    truncate_largest_data_file,
)

from simclrv2_jax import cli
from simclrv2_jax.checkpoints import CheckpointError
from simclrv2_jax.checkpoints import workdir as workdir_lib
from simclrv2_jax.config import get_config
from simclrv2_jax.train import loop, train_stage
from simclrv2_jax.train.loop import Interrupted, TrainingDiverged
from simclrv2_jax.train.state import TrainState
from simclrv2_jax.train.step import guarded_update

# Whole runs, subprocesses or processes: left out of the fast loop (launch/test.sh --fast).
pytestmark = pytest.mark.slow


N = PRETRAIN_STEPS  # 6


def config(data_dir, train_steps=N, **overrides):
    return tiny(get_config("pretrain", "fashion_mnist"), data_dir, train_steps=train_steps, **overrides)


def copy_run(pretrain_run, tmp_path, name="copy"):
    """A copy of the uninterrupted run's workdir (its one checkpoint is the final step)."""
    destination = tmp_path / name
    shutil.copytree(pretrain_run["workdir"], destination)
    return str(destination)


def all_leaves_finite(tree):
    return all(np.all(np.isfinite(v)) for v in flat(tree).values() if v.dtype.kind == "f")


# ------------------------------------------------------------------------------------------------
# 1. Divergence: a non-finite step is never applied and nothing non-finite is saved.


def tiny_state(w, m, step=0, skipped=0):
    return TrainState(
        step=jnp.int32(step),
        params={"w": jnp.asarray(w, jnp.float32)},
        batch_stats={"m": jnp.asarray(m, jnp.float32)},
        opt_state={"trace": jnp.asarray(w, jnp.float32) * 0.5},
        rng=jnp.zeros((2,), jnp.uint32),
        skipped_steps=jnp.int32(skipped),
    )


@pytest.mark.parametrize(
    "loss, new_w, new_m, budget, skipped, expect",
    [
        # (applied?, step after, skipped after, halted?, bits of the failed parts) worked out by hand.
        (1.0, [2.0, 3.0], [0.5], 0, 0, (True, 8, 0, False, 0)),
        (np.nan, [2.0, 3.0], [0.5], 0, 0, (False, 7, 1, True, 0b0001)),  # budget 0: halt, step stays
        (np.nan, [2.0, 3.0], [0.5], 2, 0, (False, 8, 1, False, 0b0001)),  # within budget: skipped
        (1.0, [np.inf, 3.0], [0.5], 2, 1, (False, 8, 2, False, 0b0100)),  # weights overflow
        (1.0, [2.0, 3.0], [np.inf], 2, 2, (False, 7, 3, True, 0b1000)),  # BN stats; budget spent
        (1.0, [2.0, 3.0], [0.5], 2, 3, (False, 7, 3, True, 0)),  # halted before: a finite step is a no-op
    ],
)
def test_guard_applies_skips_or_halts(loss, new_w, new_m, budget, skipped, expect):
    applied, step_after, skipped_after, halted, bits = expect
    old = tiny_state([1.0, 1.0], [0.25], step=7, skipped=skipped)
    new = tiny_state(new_w, new_m, step=8, skipped=skipped)
    metrics = {"loss": jnp.float32(loss), "grad_norm": jnp.float32(1.0)}
    state, out = jax.jit(guarded_update, static_argnums=3)(old, new, metrics, budget)
    expected = new if applied else old
    np.testing.assert_array_equal(state.params["w"], expected.params["w"])
    np.testing.assert_array_equal(state.batch_stats["m"], expected.batch_stats["m"])
    np.testing.assert_array_equal(state.opt_state["trace"], expected.opt_state["trace"])
    assert int(state.step) == step_after and int(state.skipped_steps) == skipped_after
    assert bool(out["halted"]) == halted and int(out["nonfinite_parts"]) == bits
    assert bool(out["nonfinite"]) == (bits != 0)


def test_divergence_stops_and_keeps_only_finite_checkpoints(tmp_path, fake_data_dir):
    workdir = str(tmp_path / "diverged")
    diverging = config(fake_data_dir, learning_rate=1e8, warmup_epochs=0.0, checkpoint_steps=2)
    with pytest.raises(TrainingDiverged) as first:
        train_stage(diverging, workdir)
    message = str(first.value)
    assert "diverged at step" in message and "resume_changes=learning_rate" in message
    assert not os.path.exists(os.path.join(workdir, "results.json"))  # never reported as completed
    steps = saved_steps(workdir)
    assert steps, "the last finite state was not saved"
    for step in steps:
        assert all_leaves_finite(read_checkpoint(workdir, step)), f"checkpoint {step} holds non-finite values"
    bad_step = int(message.split("diverged at step ")[1].split(":")[0])
    assert steps[-1] == bad_step - 1  # the last finite state, saved when the run stopped

    # The same command again resumes from that finite state and stops at the same step: the workdir
    # is not dead, it is deterministic.
    with pytest.raises(TrainingDiverged, match=f"diverged at step {bad_step}:"):
        train_stage(diverging, workdir)

    # A changed learning rate, named as a resume change, is taken up from that finite state (here the
    # weights are already too large for any rate: it diverges again at the same step), and recorded.
    seen = []
    calmer = config(
        fake_data_dir,
        learning_rate=1e-3,
        warmup_epochs=0.0,
        checkpoint_steps=2,
        resume_changes="learning_rate",
    )
    with pytest.raises(TrainingDiverged):
        train_stage(calmer, workdir, step_hooks=[record_steps(seen)])
    events = [json.loads(line) for line in open(os.path.join(workdir, "history.jsonl"))]
    changes = [e for e in events if e.get("event") == "resume_changes"]
    assert changes == [
        {"step": bad_step - 1, "event": "resume_changes", "changes": {"learning_rate": [1e8, 1e-3]}}
    ]

    # Letting the run skip the remaining steps finishes it: each skipped step is counted.
    skipping = config(
        fake_data_dir,
        learning_rate=1e-3,
        warmup_epochs=0.0,
        checkpoint_steps=2,
        skip_nonfinite_steps=N,
        resume_changes="learning_rate",
    )
    results = train_stage(skipping, workdir, step_hooks=[record_steps(seen)])
    assert results["completed"] and results["skipped_steps"] == N - bad_step + 1
    assert all_leaves_finite(read_checkpoint(workdir, N))


def test_skipped_steps_are_counted_then_the_run_stops(tmp_path, fake_data_dir):
    """At lr 1e30 the weights overflow within a step or two; from then on every step is non-finite.
    Three are skipped (the budget) and change nothing, the fourth stops the run, and the saved state
    is the last applied one, three steps on."""
    workdir = str(tmp_path / "skipping")
    blowing_up = config(fake_data_dir, learning_rate=1e30, warmup_epochs=0.0, skip_nonfinite_steps=3)
    after = {}
    with pytest.raises(TrainingDiverged, match="all 3 allowed skips were used") as stopped:
        train_stage(blowing_up, workdir, step_hooks=[lambda s, st: after.setdefault(s, flat(st.params))])
    halted = int(str(stopped.value).split("diverged at step ")[1].split(":")[0])
    last_applied = halted - 4
    saved = read_checkpoint(workdir, halted - 1)
    assert int(saved["step"]) == halted - 1 and int(saved["skipped_steps"]) == 3
    assert all_leaves_finite(saved)
    reference = after[last_applied] if last_applied else None
    if reference is None:  # nothing was ever applied: the initial weights, i.e. a run at lr 0
        fresh = train_stage(config(fake_data_dir, train_steps=1, learning_rate=0.0), str(tmp_path / "lr0"))
        reference = flat(fresh["state"].params)
    for skipped_step in range(last_applied + 1, halted):
        for key, value in reference.items():
            np.testing.assert_array_equal(
                after[skipped_step][key], value, err_msg=f"step {skipped_step} {key}"
            )
    for key, value in reference.items():
        np.testing.assert_array_equal(flat(saved["params"])[key], value, err_msg=key)


def test_divergence_through_the_command_line_is_one_error_and_exit_3(tmp_path, fake_data_dir, capsys):
    code, _ = cli.run_reporting_user_errors(
        train_stage,
        config(fake_data_dir, learning_rate=1e30, warmup_epochs=0.0),
        str(tmp_path / "w"),
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 3 and len(err) == 1 and err[0].startswith("error: pretrain diverged at step ")


# ------------------------------------------------------------------------------------------------
# 3. Interrupts at any moment end with a checkpoint of the last completed step and an honest message.


def signal_at(step, signum):
    def hook(s, state):
        if s == step:
            os.kill(os.getpid(), signum)

    return hook


def resume_and_compare(workdir, fake_data_dir, pretrain_run, expected_steps, **overrides):
    seen = []
    results = train_stage(config(fake_data_dir, **overrides), workdir, step_hooks=[record_steps(seen)])
    assert seen == expected_steps
    assert results["completed"] and results["final_step"] == N
    assert_identical(
        results["state"], pretrain_run["results"]["state"], STATE_PARTS, "resumed vs uninterrupted"
    )
    return results


def test_sigterm_right_after_a_periodic_save(tmp_path, fake_data_dir, pretrain_run):
    workdir = str(tmp_path / "w")
    with pytest.raises(Interrupted) as stopped:
        train_stage(
            config(fake_data_dir, checkpoint_steps=2), workdir, step_hooks=[signal_at(4, signal.SIGTERM)]
        )
    assert stopped.value.signum == signal.SIGTERM
    assert "stopped by SIGTERM at step 4; the checkpoint of step 4 is in" in stopped.value.message
    assert saved_steps(workdir) == [2, 4]
    # TensorBoard's events reached the disk.
    events = [n for n in os.listdir(workdir) if n.startswith("events.out.tfevents")]
    assert events and all(os.path.getsize(os.path.join(workdir, n)) > 0 for n in events)
    resume_and_compare(workdir, fake_data_dir, pretrain_run, [5, 6], checkpoint_steps=2)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_interrupt_during_the_final_evaluation(tmp_path, fake_data_dir, pretrain_run, monkeypatch, signum):
    workdir = str(tmp_path / "w")
    real_evaluate = loop.evaluate

    def evaluate_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signum)  # arrives while the evaluation starts
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", evaluate_then_signal)
    with pytest.raises(Interrupted) as stopped:
        train_stage(config(fake_data_dir, knn_monitor=True), workdir)  # its evaluation as pretrain_run's
    monkeypatch.setattr(loop, "evaluate", real_evaluate)
    name = signal.Signals(signum).name
    assert f"stopped by {name} during the final evaluation at step {N}" in stopped.value.message
    assert saved_steps(workdir) == [N]  # no training lost
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    results = resume_and_compare(workdir, fake_data_dir, pretrain_run, [], knn_monitor=True)
    assert results["steps_this_run"] == 0 and results["eval"] == pretrain_run["results"]["eval"]


def test_ctrl_c_during_a_periodic_save(tmp_path, fake_data_dir, pretrain_run, monkeypatch):
    from simclrv2_jax import checkpoints

    workdir = str(tmp_path / "w")
    real_save = checkpoints.Checkpointer.save

    sent = []

    def save_then_signal(self, step, *args, **kwargs):
        saved = real_save(self, step, *args, **kwargs)
        if step == 2 and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGINT)  # while the async save of step 2 is under way
        return saved

    monkeypatch.setattr(checkpoints.Checkpointer, "save", save_then_signal)
    with pytest.raises(Interrupted, match="stopped by SIGINT at step 2; the checkpoint of step 2 is in"):
        train_stage(config(fake_data_dir, checkpoint_steps=2), workdir)
    monkeypatch.setattr(checkpoints.Checkpointer, "save", real_save)
    resume_and_compare(workdir, fake_data_dir, pretrain_run, [3, 4, 5, 6], checkpoint_steps=2)


def test_interrupt_exit_code_and_message(tmp_path, fake_data_dir, capsys):
    import functools

    # The SIGTERM arrives through a step hook, bound with a partial.
    stage = functools.partial(train_stage, step_hooks=[signal_at(1, signal.SIGTERM)])
    code, _ = cli.run_reporting_user_errors(stage, config(fake_data_dir), str(tmp_path / "x"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 128 + signal.SIGTERM
    assert err[-1].startswith("pretrain stopped by SIGTERM at step 1; the checkpoint of step 1 is in")


# ------------------------------------------------------------------------------------------------
# 4. A resumed run is the same run: changed fields are refused or, for optimisation fields, named.


@pytest.mark.parametrize(
    "field, value, expect",
    [
        ("train_batch_size", 32, "fix the model, the data order or the random draws: train_batch_size: 16"),
        ("width_multiplier", 0.25, "width_multiplier: 0.125 in the checkpoint, 0.25 now"),
        ("seed", 1, "seed: 0 in the checkpoint, 1 now"),
        ("learning_rate", 0.5, "--config.resume_changes=learning_rate"),
        ("train_steps", N + 2, "--config.resume_changes=train_steps"),
    ],
)
def test_changed_config_on_resume_is_refused(tmp_path, fake_data_dir, pretrain_run, field, value, expect):
    workdir = copy_run(pretrain_run, tmp_path)
    before = open(os.path.join(workdir, "config.json")).read()
    with pytest.raises(
        ValueError, match="differs from the one the checkpoint|changes optimisation fields"
    ) as e:
        train_stage(config(fake_data_dir, **{field: value}), workdir)
    assert expect in str(e.value) and os.path.join(workdir, "checkpoints", str(N)) in str(e.value)
    assert open(os.path.join(workdir, "config.json")).read() == before  # not overwritten


def test_named_optimisation_change_continues_and_is_recorded(tmp_path, fake_data_dir, pretrain_run):
    workdir = copy_run(pretrain_run, tmp_path)
    seen = []
    longer = config(
        fake_data_dir, train_steps=N + 2, learning_rate=0.5, resume_changes="train_steps,learning_rate"
    )
    results = train_stage(longer, workdir, step_hooks=[record_steps(seen)])
    assert seen == [N + 1, N + 2] and results["completed"]
    rows = [json.loads(line) for line in open(os.path.join(workdir, "history.jsonl"))]
    event = [r for r in rows if r.get("event") == "resume_changes"]
    original = pretrain_run["config"].learning_rate
    assert event == [
        {
            "step": N,
            "event": "resume_changes",
            "changes": {"learning_rate": [original, 0.5], "train_steps": [N, N + 2]},
        }
    ]
    assert json.load(open(os.path.join(workdir, "config.json")))["learning_rate"] == 0.5


def test_free_fields_change_without_asking(tmp_path, fake_data_dir, pretrain_run):
    workdir = copy_run(pretrain_run, tmp_path)
    results = train_stage(config(fake_data_dir, log_every_steps=3, checkpoint_steps=7), workdir)
    assert results["completed"] and results["steps_this_run"] == 0


# ------------------------------------------------------------------------------------------------
# 5. A damaged latest checkpoint is moved aside (with its path in the log) and the run resumes from
# the newest one that loads.


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory, fake_data_dir, jax_compile_cache):
    """The tiny run with checkpoints at steps 2, 4 and 6."""
    workdir = tmp_path_factory.mktemp("checkpointed")
    train_stage(config(fake_data_dir, checkpoint_steps=2), str(workdir))
    assert saved_steps(str(workdir)) == [2, 4, 6]
    return workdir


def delete_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def delete_data_folders(step_dir):
    for name in os.listdir(os.path.join(step_dir, "state")):
        if name.startswith("ocdbt.process_") or name == "d":
            shutil.rmtree(os.path.join(step_dir, "state", name))


@pytest.mark.parametrize("damage", [truncate_largest_data_file, delete_metadata, delete_data_folders])
def test_damaged_latest_checkpoint_falls_back(
    tmp_path, fake_data_dir, pretrain_run, checkpointed_run, damage
):
    workdir = str(tmp_path / "w")
    shutil.copytree(checkpointed_run, workdir)
    os.remove(os.path.join(workdir, "results.json"))
    damage(os.path.join(workdir, "checkpoints", "6"))
    resume_and_compare(workdir, fake_data_dir, pretrain_run, [5, 6], checkpoint_steps=2)
    aside = os.listdir(os.path.join(workdir, "checkpoints_set_aside"))
    assert len(aside) == 1 and aside[0].startswith("6-")  # moved, not deleted
    assert os.path.isdir(os.path.join(workdir, "checkpoints_set_aside", aside[0], "state"))


def test_no_checkpoint_loads_is_one_error_naming_where_they_went(tmp_path, fake_data_dir, checkpointed_run):
    workdir = str(tmp_path / "w")
    shutil.copytree(checkpointed_run, workdir)
    for step in (2, 4, 6):
        delete_metadata(os.path.join(workdir, "checkpoints", str(step)))
    with pytest.raises(CheckpointError, match="No checkpoint in .* loads; the damaged ones were moved to"):
        train_stage(config(fake_data_dir, checkpoint_steps=2), workdir)
    assert len(os.listdir(os.path.join(workdir, "checkpoints_set_aside"))) == 3


# ------------------------------------------------------------------------------------------------
# 6. One run per workdir.


def test_second_run_on_a_held_workdir_refuses(tmp_path, fake_data_dir):
    workdir = tmp_path / "w"
    workdir.mkdir()
    with workdir_lib.WorkdirLock(workdir, "the first run"):
        with pytest.raises(workdir_lib.WorkdirError, match=f"in use by another run: pid {os.getpid()}"):
            train_stage(config(fake_data_dir), str(workdir))
        assert not (workdir / "checkpoints").exists()  # the second run touched nothing
    assert not (workdir / "lock.json").exists()  # released


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, fake_data_dir, pretrain_run):
    workdir = copy_run(pretrain_run, tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"host": socket.gethostname(), "pid": dead.pid, "started": "earlier", "command": "killed run"}
    with open(os.path.join(workdir, "lock.json"), "w") as f:
        json.dump(stale, f)
    results = train_stage(config(fake_data_dir), workdir)
    assert results["completed"] and not os.path.exists(os.path.join(workdir, "lock.json"))


def test_lock_from_another_host_is_stale_only_without_heartbeat(tmp_path):
    held = {"host": "another-host", "pid": 1, "started": "earlier", "command": "a run elsewhere"}
    (tmp_path / "lock.json").write_text(json.dumps(held))
    with pytest.raises(workdir_lib.WorkdirError, match="pid 1 on host another-host"):
        workdir_lib.WorkdirLock(tmp_path).acquire()
    old = time.time() - workdir_lib.STALE_AFTER_S - 60
    os.utime(tmp_path / "lock.json", (old, old))
    lock = workdir_lib.WorkdirLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / "lock.json").read_text())["pid"] == os.getpid()
    lock.release()


def test_concurrent_processes_one_wins(tmp_path):
    """Two processes racing for one workdir: exactly one gets the lock."""
    script = (
        "import sys, time; from etils import epath; from simclrv2_jax.checkpoints import workdir as w\n"
        "try:\n"
        "    lock = w.WorkdirLock(epath.Path(sys.argv[1])); lock.acquire(); print('held', flush=True)\n"
        "    time.sleep(3); lock.release()\n"
        "except w.WorkdirError as e:\n"
        "    print('refused', flush=True)\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outputs == ["held", "refused"]


# ------------------------------------------------------------------------------------------------
# 7. A workdir that cannot be used is one error line naming it, before anything is built.


def test_workdir_that_is_a_file(tmp_path, fake_data_dir):
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    with pytest.raises(workdir_lib.WorkdirError, match=f"--workdir {path} is a file"):
        train_stage(config(fake_data_dir), str(path))


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux's read-only /sys")
@pytest.mark.parametrize("workdir", ["/sys/kernel/simclrv2_jax_test", "/sys/kernel"])
def test_unwritable_workdir_is_one_error_line(workdir, fake_data_dir, jax_compile_cache):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "simclrv2_jax.main",
            "--config=configs/pretrain.py:fashion_mnist",
            f"--workdir={workdir}",
            f"--config.data_dir={fake_data_dir}",
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(jax_compile_cache),
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        timeout=300,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(("I", "W"))]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        lines[-1].startswith("error: Cannot") and workdir in lines[-1] and "writable --workdir" in lines[-1]
    )


def test_field_added_by_a_later_version_keeps_old_checkpoints_resumable(tmp_path, fake_data_dir):
    """A checkpoint's config without a field that exists now: no change while the field keeps its
    default, a refused change once it does not."""
    current = config(fake_data_dir)
    saved = json.loads(json.dumps(current.to_dict()))
    del saved["skip_nonfinite_steps"], saved["hidden_norm"]
    assert workdir_lib.check_resume(saved, current, "ckpt") == {}
    current.hidden_norm = not current.hidden_norm
    with pytest.raises(ValueError, match="hidden_norm: '\\(absent\\)' in the checkpoint"):
        workdir_lib.check_resume(saved, current, "ckpt")
