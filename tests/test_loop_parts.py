"""The training loop's parts on their own: cadence, guard reading, stop signals, history and averages."""

import json
import os
import signal

import jax.numpy as jnp
import ml_collections
import pytest
from etils import epath

from simclrv2_jax.train.guard import Guard
from simclrv2_jax.train.loop import Cadence
from simclrv2_jax.train.reporting import History, average
from simclrv2_jax.train.signals import StopSignals


def test_cadence_logs_saves_and_evaluates_on_its_multiples_and_at_the_end():
    cadence = Cadence(total=10, log_every=4, checkpoint_every=3, eval_every=5)
    assert [s for s in range(1, 11) if cadence.log(s)] == [4, 8, 10]  # and always the last step
    assert [s for s in range(1, 11) if cadence.save(s)] == [3, 6, 9]  # the final save is apart
    assert [s for s in range(1, 11) if cadence.evaluate(s)] == [5]  # the final evaluation is apart
    never = Cadence(total=10, log_every=100, checkpoint_every=100, eval_every=0)
    assert [s for s in range(1, 11) if never.evaluate(s)] == []
    config = ml_collections.ConfigDict(dict(log_every_steps=2, checkpoint_steps=7, eval_every_steps=0))
    assert Cadence.of(config, 9) == Cadence(9, 2, 7, 0)


def _flags(nonfinite=0.0, parts=0.0, halted=0.0, skipped=0.0, loss=1.0):
    return {
        "nonfinite": jnp.float32(nonfinite),
        "nonfinite_parts": jnp.float32(parts),
        "halted": jnp.float32(halted),
        "skipped_steps": jnp.float32(skipped),
        "loss": jnp.float32(loss),
        "grad_norm": jnp.float32(2.0),
    }


def test_guard_reads_each_step_once_in_order_and_names_the_failed_parts():
    guard = Guard(start_step=3, max_skipped=1)
    assert guard.read(3, _flags()) is None  # the start step was read before the resume
    report = guard.read(4, _flags(nonfinite=1.0, parts=2.0 + 8.0, skipped=1.0))
    assert (report.step, report.nonfinite, report.halted, report.skipped) == (4, True, False, 1)
    assert report.parts == ["gradients", "BN statistics"]  # bits 1 and 3 of GUARDED_PARTS
    assert guard.read(4, _flags()) is None  # once only
    halt = guard.read(5, _flags(nonfinite=1.0, parts=1.0, halted=1.0, skipped=2.0, loss=float("nan")))
    assert halt.halted and halt.parts == ["loss"] and guard.skipped == 2
    message = guard.divergence_message(
        "pretrain", halt, 4, "/w/checkpoints/4", ml_collections.ConfigDict({"learning_rate": 0.3})
    )
    assert message.startswith("pretrain diverged at step 5: non-finite loss (loss=nan, grad_norm=2);")
    assert "all 1 allowed skips were used" in message and "--config.learning_rate=0.03 " in message
    assert "(step 4) is saved in /w/checkpoints/4" in message


def test_average_leaves_out_skipped_steps_and_the_guard_flags():
    rows = [_flags(loss=1.0), _flags(loss=float("inf"), nonfinite=1.0), _flags(loss=4.0)]
    assert average(rows) == {"loss": 2.5, "grad_norm": 2.0}
    assert average([_flags(nonfinite=1.0)]) == {}


def test_history_keeps_the_lines_up_to_the_resumed_step(tmp_path):
    path = epath.Path(tmp_path) / "history.jsonl"
    path.write_text("\n".join(json.dumps({"step": s, "train/loss": float(s)}) for s in (2, 4, 6)) + "\n")
    history = History(path, start_step=4)  # steps after 4 are trained again
    history.add(6, {"train/loss": 0.5})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 2, "train/loss": 2.0},
        {"step": 4, "train/loss": 4.0},
        {"step": 6, "train/loss": 0.5},
    ]


def test_stop_signals_record_a_request_and_a_second_ctrl_c_stops_at_once():
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == signal.SIGTERM and stop.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.forced
    assert signal.getsignal(signal.SIGTERM) is not stop._handler  # handlers restored
