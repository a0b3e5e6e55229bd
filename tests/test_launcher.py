"""launch/tpu.sh against a fake `gcloud` on PATH: the commands it issues, the preemption loop, and
the remote shell snippets (start detached, exit code, status) run for real on this machine."""

import json
import os
import shlex
import subprocess
import sys
import tarfile
import time

import pytest

# Whole runs, subprocesses or processes: left out of the fast loop (launch/test.sh --fast).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "tpu.sh")

FAKE_GCLOUD = """#!{python}
# Records each call as a JSON list of its arguments; answers from the queues the test set up.
import json, os, shutil, sys

args = sys.argv[1:]
d = os.environ["FAKE_GCLOUD_DIR"]
with open(os.path.join(d, "calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\\n")

def pop(name):
    path = os.path.join(d, name)
    lines = open(path).read().splitlines() if os.path.exists(path) else []
    if not lines:
        return None
    open(path, "w").write("".join(line + "\\n" for line in lines[1:]))
    return lines[0]

if args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    print(pop("states") or "ACTIVE")
elif args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    shutil.copy(args[4], os.path.join(d, "archive%d.tar.gz" % len(os.listdir(d))))
elif any("run.exit 2>/dev/null" in a for a in args):
    code = pop("exits")
    if code:
        print(code)
"""


@pytest.fixture
def fake(tmp_path):
    bin_dir, state = tmp_path / "bin", tmp_path / "gcloud"
    bin_dir.mkdir()
    state.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        FAKE_GCLOUD_DIR=str(state),
        TPU_NAME="pod",
        ZONE="us-central2-b",
        PROJECT="proj",
        POLL_S="0",
        LINES="24",  # a terminal's height, as interactive shells export it: not the log length
    )
    env.pop("DRY_RUN", None)
    env.pop("KEEP_ALIVE", None)
    return env, state


def tpu(env, *args, **extra):
    return subprocess.run(
        ["bash", SCRIPT, *args],
        env={**env, **extra},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def calls(state):
    path = state / "calls.jsonl"
    return [json.loads(line) for line in open(path)] if path.exists() else []


def kind(call):
    """'scp', 'ssh:<what>', 'describe', 'create', 'delete' for a recorded call."""
    if call[:3] == ["compute", "tpus", "queued-resources"]:
        return call[3]
    if call[3] == "scp":
        return "scp"
    command = next(a for a in call if a.startswith("--command="))
    for word, name in (("pip install", "install"), ("setsid", "start"), ("run.exit 2>/dev/null", "exit?")):
        if word in command:
            return f"ssh:{name}"
    return "ssh:other"


def command_of(call):
    return next(a for a in call if a.startswith("--command="))[len("--command=") :]


ARGS = (
    "--config=configs/pretrain.py:imagenet,r50_1x_sk0",
    "--workdir=gs://bucket/r50 run",
    "--config.note=it's",
)


def test_dry_run_prints_every_gcloud_command_and_runs_none(fake):
    env, state = fake
    out = tpu(env, "run", *ARGS, DRY_RUN="1", KEEP_ALIVE="1")
    assert out.returncode == 0, out.stderr
    lines = [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ gcloud")]
    assert len(lines) == 3 and calls(state) == []  # printed, never called
    where = ["--zone=us-central2-b", "--project=proj"]
    scp, install, start = lines
    assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", scp[5]] and scp[5].endswith(".tar.gz")
    assert scp[6:] == ["pod:/tmp/simclrv2_jax.tar.gz", "--worker=all", *where]
    for call in (install, start):
        assert call[1:6] == ["compute", "tpus", "tpu-vm", "ssh", "pod"] and call[6] == "--worker=all"
        assert call[-2:] == where
    assert "pip install -q -e '.[tpu]'" in install[7]
    assert "nohup setsid bash job.sh" in start[7] and "logs/run.pid" in start[7]
    assert "would now poll every 0s" in out.stderr

    follow = tpu(env, "logs", DRY_RUN="1", WORKER="1", FOLLOW="1")
    assert [shlex.split(line[2:]) for line in follow.stdout.splitlines()] == [
        [
            "gcloud",
            *("compute", "tpus", "tpu-vm", "ssh", "pod", "--worker=1"),
            "--command=tail -n 100 -F ~/simclrv2_jax/logs/run.log",
            *where,
        ]
    ]

    create = tpu(env, "create", DRY_RUN="1", SPOT="1", ACCELERATOR_TYPE="v4-64")
    assert create.returncode == 0, create.stderr
    assert [shlex.split(line[2:]) for line in create.stdout.splitlines()] == [
        [
            "gcloud",
            *("compute", "tpus", "queued-resources", "create", "pod-qr"),
            "--node-id=pod",
            "--accelerator-type=v4-64",
            "--runtime-version=tpu-ubuntu2204-base",
            "--spot",
            *where,
        ]
    ]
    assert calls(state) == []


def test_preempted_run_is_recreated_and_relaunched_until_it_finishes(fake):
    env, state = fake
    # Polls: preempted; while recreating: creating, active; then running, running, finished.
    (state / "states").write_text("SUSPENDED\nCREATING\nACTIVE\nACTIVE\nACTIVE\n")
    (state / "exits").write_text("\n0\n")
    out = tpu(env, "run", *ARGS, KEEP_ALIVE="1", SPOT="1")
    assert out.returncode == 0, out.stderr
    assert [kind(c) for c in calls(state)] == [
        *("scp", "ssh:install", "ssh:start"),
        *("describe", "delete", "create", "describe", "describe"),
        *("scp", "ssh:install", "ssh:start"),
        *("describe", "ssh:exit?", "describe", "ssh:exit?"),
    ]
    create = next(c for c in calls(state) if kind(c) == "create")
    assert "--spot" in create and "--node-id=pod" in create
    assert "preempted; restart 1 of 20" in out.stderr and "the run finished (exit 0)" in out.stderr

    # Both launches shipped the tracked files and the same job script with the arguments intact.
    archives = sorted(p for p in os.listdir(state) if p.startswith("archive"))
    assert len(archives) == 2
    for name in archives:
        with tarfile.open(state / name) as tar:
            names = tar.getnames()
            assert "simclrv2_jax/train/loop.py" in names and "launch/setup.sh" in names
            job = tar.extractfile("job.sh").read().decode()
        line = next(x for x in job.splitlines() if "-m simclrv2_jax.main" in x)
        assert shlex.split(line)[2:] == [".venv/bin/python", "-m", "simclrv2_jax.main", *ARGS]


def test_a_failed_run_is_reported_not_retried(fake):
    env, state = fake
    (state / "exits").write_text("3\n")
    out = tpu(env, "run", *ARGS, KEEP_ALIVE="1")
    assert out.returncode == 1
    assert "exit code 3 (not a preemption; not retried)" in out.stderr
    assert [kind(c) for c in calls(state)].count("ssh:start") == 1


def test_settings_are_required():
    env = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE")}
    out = tpu(env, "status")
    assert out.returncode != 0 and "set TPU_NAME" in out.stderr
    assert tpu({**env, "TPU_NAME": "x", "ZONE": "z"}, "frobnicate").returncode == 2


def test_remote_snippets_start_detached_and_report_for_real(fake, tmp_path):
    """The start, status, stop and log commands tpu.sh sends, run here with HOME as the worker's home
    and a stand-in for the worker's Python: the job outlives the shell that started it, its output
    lands in logs/run.log with the arguments intact, its exit code in logs/run.exit."""
    env, state = fake
    assert tpu(env, "run", *ARGS).returncode == 0
    home = tmp_path / "worker_home"
    project = home / "simclrv2_jax"
    (project / ".venv" / "bin").mkdir(parents=True)
    archive = state / next(p for p in sorted(os.listdir(state)) if p.startswith("archive"))
    with tarfile.open(archive) as tar:
        tar.extract("job.sh", project)
    python = project / ".venv" / "bin" / "python"
    python.write_text('#!/usr/bin/env bash\nfor a in "$@"; do echo "arg:$a"; done\nsleep 1\nexit 3\n')
    python.chmod(0o755)
    start = command_of(next(c for c in calls(state) if kind(c) == "ssh:start"))
    worker = {**env, "HOME": str(home)}
    began = time.time()
    subprocess.run(["bash", "-c", start], env=worker, check=True, timeout=30)
    assert time.time() - began < 1  # returned at once: the job runs detached
    pid = int((project / "logs" / "run.pid").read_text())
    exit_file = project / "logs" / "run.exit"
    while not exit_file.exists() and time.time() - began < 30:
        time.sleep(0.1)
    assert exit_file.read_text().strip() == "3"
    log = (project / "logs" / "run.log").read_text().splitlines()
    assert log == ["arg:-m", "arg:simclrv2_jax.main", *(f"arg:{a}" for a in ARGS)]
    assert pid > 1

    before = len(calls(state))
    assert tpu(env, "status").returncode == 0
    status_cmd = command_of(calls(state)[-1])
    assert len(calls(state)) == before + 2  # the queued resource's state, then the workers'
    shown = subprocess.run(["bash", "-c", status_cmd], env=worker, capture_output=True, text=True)
    assert "exited 3 | arg:--config.note=it's" in shown.stdout

    # stop: SIGTERM to the job's whole process group.
    python.write_text("#!/usr/bin/env bash\nsleep 60\n")
    subprocess.run(["bash", "-c", start], env=worker, check=True, timeout=30)
    assert not exit_file.exists()  # the start cleared the last run's code
    refused = subprocess.run(["bash", "-c", start], env=worker, capture_output=True, text=True)
    assert refused.returncode == 1 and "a run is already going" in refused.stderr
    assert tpu(env, "stop").returncode == 0
    subprocess.run(["bash", "-c", command_of(calls(state)[-1])], env=worker, check=True, timeout=30)
    began = time.time()
    while not exit_file.exists() and time.time() - began < 30:
        time.sleep(0.1)
    assert exit_file.read_text().strip() == "143"  # 128 + SIGTERM
