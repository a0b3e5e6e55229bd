"""Fault injection: the pretraining stage killed at random moments, resumed, and compared bit for bit.

    python -m benchmarks.faults                       # 20 faults, seed 0
    python -m benchmarks.faults --runs=5 --seed=3

First an uninterrupted reference run of a small pretraining config (the ``fashion_mnist`` preset made
tiny: ResNet-18 x0.125 at 16 px, batch 32, 12 steps, a checkpoint every 3 steps, an evaluation at
step 6 and at the end). Then, ``--runs`` times, a fresh run in its own workdir is hit at a random
moment of each kind below in turn, with SIGKILL, SIGTERM or SIGINT (Ctrl-C) drawn at random:

* ``time``: after a random delay between 0 and the reference run's duration;
* ``step``: right after a random step;
* ``periodic_save``: 0-100 ms after a periodic save of a random step began (the async write is
  usually still under way);
* ``eval``: 0-300 ms into the evaluation at step 6;
* ``final_eval``: 0-300 ms into the final evaluation;
* ``final_save``: 0-100 ms after the final save began.

The same command is then run again (up to 3 times) until it exits 0, and the final checkpoint's
every array (weights, BN statistics, optimiser state, RNG, step counters) and the final evaluation
must equal the reference's exactly. Each child is ``python -m benchmarks.faults --child=...``: it
installs the fault in this process and runs the stage as ``python -m simclrv2_jax.main`` does.

Writes ``benchmarks/results/faults.json``: each fault (moment, signal, exit code, last message,
resume attempts), the number identical to the reference, and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib

from benchmarks.common import cpu_info

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOMENTS = ("time", "step", "periodic_save", "eval", "final_eval", "final_save")
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}
STEPS, CHECKPOINT_STEPS, EVAL_STEP = 12, 3, 6


def overrides(data_dir: str) -> list[str]:
    return [
        "--config=configs/pretrain.py:fashion_mnist",
        f"--config.data_dir={data_dir}",
        "--config.resnet_depth=18",
        "--config.width_multiplier=0.125",
        "--config.image_size=16",
        "--config.proj_out_dim=16",
        "--config.train_batch_size=32",
        "--config.eval_batch_size=1000",
        f"--config.train_steps={STEPS}",
        f"--config.checkpoint_steps={CHECKPOINT_STEPS}",
        f"--config.eval_every_steps={EVAL_STEP}",
        "--config.log_every_steps=2",
    ]


# ------------------------------------------------------------------------------------------------
# The child: installs one fault, then runs the stage like ``simclrv2_jax.main``.


def _fire_after(delay_s: float, signum: int) -> None:
    timer = threading.Timer(delay_s, os.kill, (os.getpid(), signum))
    timer.daemon = True
    timer.start()


def install_fault(moment: str, value: float, signum: int) -> None:
    from simclrv2_jax import checkpoints
    from simclrv2_jax.train import loop

    if moment == "time":
        _fire_after(value, signum)
    elif moment == "step":
        real_run = loop.run

        def run(*args, step_hooks=(), **kwargs):
            def hook(step, state):
                if step == int(value):
                    os.kill(os.getpid(), signum)

            return real_run(*args, step_hooks=(*step_hooks, hook), **kwargs)

        loop.run = run
    elif moment in ("periodic_save", "final_save"):
        target = int(value) if moment == "periodic_save" else STEPS
        real_save = checkpoints.Checkpointer.save

        def save(self, step, *args, **kwargs):
            saved = real_save(self, step, *args, **kwargs)
            if saved and step == target:
                _fire_after(random.uniform(0.0, 0.1), signum)
            return saved

        checkpoints.Checkpointer.save = save
    elif moment in ("eval", "final_eval"):
        real_evaluate = loop.evaluate
        calls = []

        def evaluate(*args, **kwargs):
            calls.append(1)
            if len(calls) == (1 if moment == "eval" else 2):
                _fire_after(random.uniform(0.0, 0.3), signum)
            return real_evaluate(*args, **kwargs)

        loop.evaluate = evaluate
    else:
        raise ValueError(f"unknown fault moment {moment!r}")


def child(fault: str, workdir: str, argv: list[str]) -> int:
    """``fault`` is ``moment:value:SIGNAL``; ``argv`` the config flags."""
    from ml_collections import config_flags

    from simclrv2_jax.cli import parse_flags, run_reporting_user_errors, start_up
    from simclrv2_jax.train import train_stage

    config_flag = config_flags.DEFINE_config_file("config", None, "Stage config.", lock_config=True)
    parse_flags([sys.argv[0], *argv])
    start_up()
    moment, value, name = fault.split(":")
    random.seed(zlib.crc32(fault.encode()))
    install_fault(moment, float(value), SIGNALS[name])
    code, _ = run_reporting_user_errors(train_stage, config_flag.value, workdir)
    return code


# ------------------------------------------------------------------------------------------------
# The parent.


def run_command(args: list[str], env: dict, timeout: float = 900) -> tuple[int, str, float]:
    t0 = time.time()
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and not line.startswith(("I1", "W1", "I0", "W0", "WARNING: All log"))
    ]
    return result.returncode, (lines[-1] if lines else ""), time.time() - t0


def final_arrays(workdir: str) -> dict:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", str(STEPS), "state")
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata.tree
        as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(restored)}


def identical(a: dict, b: dict) -> bool:
    import numpy as np

    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and np.array_equal(a[k], b[k]) for k in a
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "faults.json"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        sys.exit(child(args.child, args.workdir, rest))

    rng = random.Random(args.seed)
    root = tempfile.mkdtemp(prefix="simclrv2_faults_")
    env = dict(
        os.environ,
        JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
        JAX_COMPILATION_CACHE_DIR=os.path.join(root, "compile_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    flags = overrides(args.data_dir)
    main_command = [sys.executable, "-m", "simclrv2_jax.main"]

    reference_dir = os.path.join(root, "reference")
    code, message, _ = run_command([*main_command, f"--workdir={reference_dir}", *flags], env)
    if code != 0:
        raise SystemExit(f"the reference run failed ({code}): {message}")
    # Timed again with a warm compilation cache, as the faulted runs are.
    shutil.rmtree(reference_dir)
    code, message, reference_s = run_command([*main_command, f"--workdir={reference_dir}", *flags], env)
    reference = final_arrays(reference_dir)
    with open(os.path.join(reference_dir, "results.json")) as f:
        reference_eval = json.load(f)["eval"]
    print(f"reference: {reference_s:.1f} s, {len(reference)} arrays, eval {reference_eval}", flush=True)

    faults = []
    for i in range(args.runs):
        moment = MOMENTS[i % len(MOMENTS)]  # every kind of moment, in turn; when within it is random
        name = rng.choice(sorted(SIGNALS))
        value = {
            "time": round(rng.uniform(0.0, reference_s), 2),
            "step": rng.randint(1, STEPS),
            "periodic_save": rng.choice(range(CHECKPOINT_STEPS, STEPS, CHECKPOINT_STEPS)),
        }.get(moment, 0)
        fault = f"{moment}:{value}:{name}"
        workdir = os.path.join(root, f"run{i}")
        child_command = [
            sys.executable,
            "-m",
            "benchmarks.faults",
            f"--child={fault}",
            f"--workdir={workdir}",
        ]
        code, message, _ = run_command([*child_command, *flags], env)
        attempts = []
        while not attempts or (attempts[-1]["exit_code"] != 0 and len(attempts) < 3):
            resume_code, resume_message, seconds = run_command(
                [*main_command, f"--workdir={workdir}", *flags], env
            )
            attempts.append(
                {"exit_code": resume_code, "message": resume_message, "seconds": round(seconds, 1)}
            )
        same = False
        if attempts[-1]["exit_code"] == 0:
            with open(os.path.join(workdir, "results.json")) as f:
                same = identical(final_arrays(workdir), reference) and json.load(f)["eval"] == reference_eval
        record = {
            "fault": fault,
            "exit_code": code,
            "message": message,
            "resume_attempts": attempts,
            "set_aside": sorted(os.listdir(os.path.join(workdir, "checkpoints_set_aside")))
            if os.path.isdir(os.path.join(workdir, "checkpoints_set_aside"))
            else [],
            "identical_to_reference": same,
        }
        faults.append(record)
        print(
            f"[{i + 1}/{args.runs}] {fault}: exit {code}, resumed {len(attempts)}x, identical={same}",
            flush=True,
        )
        shutil.rmtree(workdir, ignore_errors=True)

    summary = {
        "benchmark": "faults",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": cpu_info(),
        "seed": args.seed,
        "config": flags,
        "reference_seconds": round(reference_s, 1),
        "runs": len(faults),
        "identical": sum(f["identical_to_reference"] for f in faults),
        "by_moment": {m: sum(f["fault"].startswith(m + ":") for f in faults) for m in MOMENTS},
        "by_signal": {s: sum(f["fault"].endswith(":" + s) for f in faults) for s in SIGNALS},
        "faults": faults,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
    shutil.rmtree(root, ignore_errors=True)
    print(f"{summary['identical']}/{summary['runs']} resumed runs identical to the reference -> {args.out}")


if __name__ == "__main__":
    main()
