"""The command line end to end: one 2-step pretraining run on fake data, then the same command again;
and user mistakes that must end in one ``error:`` line and exit code 2.

The two training subprocesses each pay JAX start-up and compilation (they share the session's
compilation cache); the mistakes are refused before anything is compiled.
"""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf
from conftest import IDX_FILES, TINY_MODEL, read_checkpoint, subprocess_env, write_fake_fashion_mnist

# Whole runs, subprocesses or processes: left out of the fast loop (launch/test.sh --fast).
pytestmark = pytest.mark.slow


REPO = Path(__file__).resolve().parents[1]
STEPS = 2


def command(workdir, data_dir):
    overrides = dict(
        TINY_MODEL,
        train_steps=STEPS,
        data_dir=data_dir,
        train_batch_size=16,
        eval_batch_size=40,
        log_every_steps=1,
    )
    return [
        sys.executable,
        "-m",
        "simclrv2_jax.main",
        "--config=configs/pretrain.py:fashion_mnist",
        f"--workdir={workdir}",
    ] + [f"--config.{k}={v}" for k, v in overrides.items()]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, fake_data_dir, jax_compile_cache):
    workdir = tmp_path_factory.mktemp("cli") / "run"
    env = subprocess_env(jax_compile_cache)
    runs = []
    for _ in range(2):
        proc = subprocess.run(
            command(workdir, fake_data_dir),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=500,
            check=False,
        )
        results = json.loads((workdir / "results.json").read_text()) if proc.returncode == 0 else None
        runs.append(
            {
                "proc": proc,
                "results": results,
                "history": history(workdir),
                "checkpoints": sorted(os.listdir(workdir / "checkpoints")),
            }
        )
    return workdir, runs


def history(workdir):
    path = workdir / "history.jsonl"
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def event_tags(workdir):
    """``{tag: [steps]}`` of the scalars in the TensorBoard event files, read as TFRecords."""
    tags = {}
    for path in glob.glob(str(workdir / "events.out.tfevents*")):
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            event = tf.compat.v1.Event.FromString(record)
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    return tags


def test_cli_run_writes_every_output(cli_runs, fake_data_dir):
    workdir, (first, _) = cli_runs
    assert first["proc"].returncode == 0, first["proc"].stderr[-3000:]
    results = first["results"]
    assert results["stage"] == "pretrain" and results["final_step"] == STEPS
    assert results["steps_this_run"] == STEPS and results["devices"] == 8
    assert set(results["eval"]) >= {"top1", "loss"}

    config = json.loads((workdir / "config.json").read_text())  # the overrides reached the run
    assert config["train_steps"] == STEPS and config["width_multiplier"] == 0.125
    assert config["data_dir"] == str(fake_data_dir) and config["stage"] == "pretrain"

    train = [r for r in first["history"] if "train/contrast_loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert any("eval/top1" in r and r["step"] == STEPS for r in first["history"])

    assert glob.glob(str(workdir / "events.out.tfevents*"))
    assert sorted(event_tags(workdir)["train/contrast_loss"]) == [1, 2]

    assert first["checkpoints"] == [str(STEPS)]
    assert int(read_checkpoint(workdir, STEPS)["step"]) == STEPS


def test_same_command_again_resumes_without_training(cli_runs):
    _, (first, second) = cli_runs
    assert second["proc"].returncode == 0, second["proc"].stderr[-3000:]
    results = second["results"]
    assert results["final_step"] == STEPS and results["steps_this_run"] == 0 and results["completed"]
    # The final evaluation, run again on the restored weights, scores what the first run scored.
    assert results["eval"]["top1"] == first["results"]["eval"]["top1"]
    assert (
        abs(results["eval"]["loss"] - first["results"]["eval"]["loss"])
        <= 1e-6 * first["results"]["eval"]["loss"]
    )
    # Nothing was trained again: the same training lines, the same single checkpoint.
    assert [r["step"] for r in second["history"] if "train/contrast_loss" in r] == [1, 2]
    assert second["checkpoints"] == [str(STEPS)]


# ------------------------------------------------------------------------------------------------
# User mistakes: one ``error:`` line on stderr, exit code 2, no traceback.


def run_module(module, args, env):
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_truncated_data_file_is_one_error_line(tmp_path, jax_compile_cache):
    data_dir = tmp_path / "data"
    write_fake_fashion_mnist(data_dir, n_train=20, n_test=10)
    damaged = data_dir / IDX_FILES["train"][0]
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    workdir = tmp_path / "run"
    # Compilations are logged, to show that the run stopped at data loading, before compiling anything.
    env = dict(subprocess_env(jax_compile_cache), JAX_LOG_COMPILES="1")
    proc = run_module(
        "simclrv2_jax.main",
        [
            "--config=configs/pretrain.py:fashion_mnist",
            f"--workdir={workdir}",
            f"--config.data_dir={data_dir}",
            "--config.train_steps=1",
        ],
        env,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error:") and str(damaged) in last and "truncated" in last, last
    assert "Traceback" not in proc.stderr
    assert "Compiling" not in proc.stderr, proc.stderr[-3000:]
    assert not (workdir / "checkpoints").exists()


@pytest.mark.parametrize(
    "override, field",
    [
        ("--pretrain.nosuch=1", "nosuch"),
        ("--finetune.no_such_field=0.5", "no_such_field"),
        ("--distill.nosuch.deeper=1", "nosuch"),
        ("--baseline.train_step=3", "train_step"),  # a typo of train_steps
        ("--pretrain.train_steps=abc", "train_steps"),
        ("--finetune.label_fraction=half", "label_fraction"),
        ("--distill.temperature=warm", "temperature"),
        ("--baseline.train_batch_size=1.5", "train_batch_size"),
    ],
)
def test_run_all_bad_override_is_one_error_line(tmp_path, override, field):
    workdir = tmp_path / "pipeline"
    proc = run_module(
        "simclrv2_jax.run_all",
        [f"--workdir={workdir}", override],
        dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: bad command line") and field in lines[0], lines[0]
    assert override.split("=")[0].lstrip("-") in lines[0]  # the override given
    assert "Traceback" not in proc.stderr
    assert not workdir.exists()  # refused before anything ran


@pytest.mark.parametrize(
    "module, args, expect",
    [
        ("simclrv2_jax.main", ["--config=configs/nosuch.py"], "error: the --config file does not load"),
        (
            "simclrv2_jax.run_all",
            ["--finetune=configs/nosuch.py"],
            "error: the --finetune file does not load",
        ),
        (
            "simclrv2_jax.main",
            ["--config=configs/pretrain.py:nosuchpreset"],
            "Unknown config preset 'nosuchpreset'",
        ),
    ],
)
def test_config_file_that_does_not_load_is_one_error_line(tmp_path, module, args, expect):
    workdir = tmp_path / "w"
    proc = run_module(module, [f"--workdir={workdir}", *args], dict(os.environ, JAX_PLATFORMS="cpu"))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error:") and expect in lines[0] and "Traceback" not in proc.stderr
    assert not workdir.exists()
