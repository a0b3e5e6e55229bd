"""Evaluation on its own (``simclrv2_jax.evaluate``): the latest checkpoint, one step, or every
checkpoint as a training run saves it.

The reference numbers are counted here in NumPy from the saved weights (read back with Orbax
directly) applied to the test images read from their IDX file: top-1 and top-5 as label ranks,
the loss as a float64 log-softmax cross-entropy. They check the whole evaluator: restoring only
the weights, the eval split's batching, padding and sharding over 8 devices, and the averaging.
"""

from __future__ import annotations

import json
import threading
import time

import jax
import numpy as np
import pytest
from conftest import numpy_metrics, split_images

from simclrv2_jax import checkpoints
from simclrv2_jax.checkpoints import CheckpointError
from simclrv2_jax.checkpoints import workdir as workdir_lib
from simclrv2_jax.data import device_augment
from simclrv2_jax.evaluation import evaluator as evaluate
from simclrv2_jax.train import components, parallel

# Whole runs, subprocesses or processes: left out of the fast loop (launch/test.sh --fast).
pytestmark = pytest.mark.slow


def reference(config, variables, data_dir, head_mode="pretrain"):
    """Top-1/top-5/loss of ``variables`` on the whole test split, counted in NumPy."""
    images, labels = split_images(data_dir)
    model = components.build_model(config, head_mode=head_mode, num_classes=10, mesh=parallel.create_mesh())
    x = device_augment.preprocess_for_eval(images, height=config.image_size, width=config.image_size)
    if not isinstance(variables, dict):  # a TrainState snapshot
        variables = {"params": variables.params, "batch_stats": variables.batch_stats}
    logits = model.apply(
        {"params": variables["params"], "batch_stats": variables["batch_stats"]}, x, train=False
    )["logits_sup"]
    return numpy_metrics(logits, labels)


def assert_metrics(entry, expected, num_examples=40):
    assert entry["num_examples"] == num_examples
    assert entry["top1"] == pytest.approx(expected["top1"], abs=1e-9)
    assert entry["top5"] == pytest.approx(expected["top5"], abs=1e-9)
    assert entry["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_numpy_metrics_by_hand():
    """The reference itself, on numbers worked out by hand."""
    # Ranks of the labels: 0, 1 and 5 (the last is outside the top 5).
    logits = np.array([[3.0, 1, 0, 0, 0, 0], [1.0, 3, 0, 0, 0, 0], [6.0, 5, 4, 3, 2, 1]])
    got = numpy_metrics(logits, np.array([0, 0, 5]))
    assert got["top1"] == pytest.approx(1 / 3) and got["top5"] == pytest.approx(2 / 3)
    lse = [
        np.log(np.exp(3) + np.exp(1) + 4),
        np.log(np.exp(3) + np.exp(1) + 4),
        np.log(np.exp(np.arange(1, 7)).sum()),
    ]
    assert got["loss"] == pytest.approx(np.mean([lse[0] - 3, lse[1] - 1, lse[2] - 1]))


def test_latest_checkpoint_of_a_pretraining_run(pretrain_run, fake_data_dir, tmp_path):
    from conftest import PRETRAIN_STEPS, read_checkpoint

    out = tmp_path / "out"
    (entry,) = evaluate.evaluate_run(str(pretrain_run["workdir"]), output_dir=str(out))
    expected = reference(pretrain_run["config"], read_checkpoint(pretrain_run["workdir"]), fake_data_dir)
    assert entry["step"] == PRETRAIN_STEPS and entry["stage"] == "pretrain"
    assert_metrics(entry, expected)
    # The run's own final evaluation saw the same weights and data.
    for key in ("top1", "top5", "loss"):
        assert pretrain_run["results"]["eval"][key] == pytest.approx(expected[key], rel=1e-5)

    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["latest"] == saved["results"][0] == json.loads(json.dumps(entry))

    import tensorflow as tf

    (events,) = [p for p in (out / "eval_test").iterdir() if "tfevents" in p.name]
    scalars = {}
    for event in tf.compat.v1.train.summary_iterator(str(events)):
        for value in event.summary.value:
            scalars[value.tag] = (event.step, float(tf.make_ndarray(value.tensor)))
    for key in ("top1", "top5", "loss"):
        step, value = scalars[f"eval/{key}"]
        assert step == PRETRAIN_STEPS and value == pytest.approx(expected[key], rel=1e-5)


def test_every_checkpoint_as_the_run_saves_it(pretrain_run, fake_data_dir, tmp_path):
    """A run (here: this test, holding the workdir's lock) saves steps 2, 4 and 6 while the evaluator
    watches; each is evaluated once, and the evaluator ends when the run's results say it finished."""
    run = tmp_path / "run"
    run.mkdir()
    config = pretrain_run["config"]
    snapshots = pretrain_run["snapshots"]
    found: dict = {}

    def watcher():
        try:
            found["entries"] = evaluate.evaluate_run(
                str(run), every_checkpoint=True, poll_s=0.05, timeout_s=120.0
            )
        except BaseException as e:  # reported by the main thread
            found["error"] = e

    with workdir_lib.WorkdirLock(workdir_lib.prepare(str(run))):
        thread = threading.Thread(target=watcher)
        thread.start()
        saver = checkpoints.Checkpointer(str(run), max_to_keep=10)
        for step in (2, 4, 6):
            time.sleep(0.5)
            saver.save(step, snapshots[step], config)
            saver.wait_until_finished()
        saver.close()
        time.sleep(1.0)
        assert thread.is_alive(), found  # the run still holds the workdir: the evaluator waits for more
        (run / "results.json").write_text(json.dumps({"completed": True, "final_step": 6}))
    thread.join(timeout=600)
    assert not thread.is_alive() and "error" not in found, found.get("error")
    entries = found["entries"]
    assert [e["step"] for e in entries] == [2, 4, 6]
    for entry in entries:
        assert_metrics(entry, reference(config, snapshots[entry["step"]], fake_data_dir))
    saved = json.loads((run / "eval_results.json").read_text())
    assert [e["step"] for e in saved["results"]] == [2, 4, 6] and saved["latest"]["step"] == 6

    # Run again: everything is evaluated already, and the run has finished: nothing to do.
    assert evaluate.evaluate_run(str(run), every_checkpoint=True, poll_s=0.05, timeout_s=120.0) == []
    # One step on request, evaluated again even though it is recorded.
    (entry,) = evaluate.evaluate_run(str(run), step=4)
    assert_metrics(entry, reference(config, snapshots[4], fake_data_dir))


class FakeTime:
    def __init__(self):
        self.now = 0.0

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_watch_yields_each_new_step_once_in_order():
    t = FakeTime()
    appear = {0.0: [1], 5.0: [1, 3, 2], 9.0: [2, 3, 7]}  # time -> what the folder shows from then

    def listing():
        return sorted(appear[max(k for k in appear if k <= t.now)])

    steps = evaluate.watch(
        listing,
        done=lambda s: s == 7,
        running=lambda: True,
        timeout_s=100,
        poll_s=1,
        sleep=t.sleep,
        clock=t.clock,
    )
    assert list(steps) == [1, 2, 3, 7]
    assert t.now == 9.0


def test_watch_waits_while_the_run_lives_and_times_out_after_it_is_gone():
    t = FakeTime()
    steps = evaluate.watch(
        lambda: [5],
        done=lambda s: False,
        running=lambda: t.now < 50,
        timeout_s=20,
        poll_s=1,
        sleep=t.sleep,
        clock=t.clock,
    )
    assert list(steps) == [5]
    # Polled each second; the run is last seen alive at t=49 (past the timeout counted from the
    # start), and the evaluator gives up 20 s after that.
    assert t.now == 69.0


def test_watch_with_nothing_ever_saved_gives_up_after_the_timeout():
    t = FakeTime()
    steps = evaluate.watch(
        lambda: [],
        done=lambda s: False,
        running=lambda: False,
        timeout_s=30,
        poll_s=2,
        sleep=t.sleep,
        clock=t.clock,
    )
    assert list(steps) == [] and t.now == 30.0


def test_errors_name_the_path_and_the_fix(pretrain_run, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match=f"{missing} does not exist. Point --workdir"):
        evaluate.evaluate_run(str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="No finished checkpoint"):
        evaluate.evaluate_run(str(empty))
    with pytest.raises(CheckpointError, match=r"No checkpoint appeared .* within 0.2 s"):
        evaluate.evaluate_run(str(empty), every_checkpoint=True, timeout_s=0.2, poll_s=0.05)
    with pytest.raises(CheckpointError, match=r"No checkpoint of step 3 under .*; it has steps \[6\]"):
        evaluate.evaluate_run(str(pretrain_run["workdir"]), step=3, output_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="cannot change width_multiplier"):
        evaluate.evaluation_config(pretrain_run["config"].to_dict(), {"width_multiplier": 1.0})
    with pytest.raises(ValueError, match="CIFAR stem .* --config.image_size=64"):
        evaluate.evaluation_config(pretrain_run["config"].to_dict(), {"image_size": 64})
    no_head = {**pretrain_run["config"].to_dict(), "lineareval_while_pretraining": False}
    with pytest.raises(ValueError, match="no supervised head to evaluate"):
        evaluate.require_supervised_head(evaluate.evaluation_config(no_head, {}))


def test_another_data_set_brings_its_own_eval_split(pretrain_run):
    saved = {**pretrain_run["config"].to_dict(), "dataset": "imagenet2012", "eval_split": "validation"}
    config = evaluate.evaluation_config(saved, {"dataset": "fashion_mnist"})
    assert (config.dataset, config.eval_split) == ("fashion_mnist", "test")
    config = evaluate.evaluation_config(saved, {"dataset": "fashion_mnist", "eval_split": "train"})
    assert config.eval_split == "train"


def test_a_checkpoint_that_does_not_fit_its_config_is_one_error(pretrain_run, fake_data_dir, tmp_path):
    """A checkpoint whose weights are not those of the network its config describes."""
    run = tmp_path / "mismatch"
    wider = pretrain_run["config"].copy_and_resolve_references()
    wider.width_multiplier = 0.25  # the weights are those of width 0.125
    saver = checkpoints.Checkpointer(str(run))
    saver.save(6, pretrain_run["snapshots"][6], wider)
    saver.wait_until_finished()
    saver.close()
    with pytest.raises(CheckpointError) as error:
        evaluate.evaluate_run(str(run))
    text = str(error.value)
    assert "does not fit the model this config builds" in text and "checkpoint has shape" in text
    assert str(run / "checkpoints" / "6") in text


def test_command_line_refuses_fields_it_cannot_change(tmp_path, jax_compile_cache):
    import subprocess
    import sys
    from pathlib import Path

    from conftest import subprocess_env

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "simclrv2_jax.evaluate",
            f"--workdir={tmp_path}",
            "--config.width_multiplier=2",
        ],
        cwd=Path(__file__).resolve().parents[1],
        env=subprocess_env(jax_compile_cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines == [proc.stderr.strip().splitlines()[-1]]
    assert "cannot set 'width_multiplier'" in lines[0] and "--config.eval_split" in lines[0]
    assert "Traceback" not in proc.stderr


def test_an_eval_batch_the_devices_cannot_share_is_refused(pretrain_run, tmp_path):
    """41 examples over 8 devices: refused before anything runs, naming the field."""
    assert jax.device_count() == 8
    with pytest.raises(ValueError, match="eval_batch_size"):
        evaluate.evaluate_run(
            str(pretrain_run["workdir"]), overrides={"eval_batch_size": 41}, output_dir=str(tmp_path)
        )
