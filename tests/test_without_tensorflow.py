"""The whole pipeline where TensorFlow and tensorflow-datasets cannot be imported.

An accelerator host often has no TensorFlow. With in-memory data (Fashion-MNIST's IDX files) and the
augmentations on the device, pretraining, fine-tuning, distillation and the baseline must all run
there: the subprocess below makes ``import tensorflow`` and ``import tensorflow_datasets`` fail
(``None`` in ``sys.modules``), so any use of either, direct or through a library, stops it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_MODEL, subprocess_env

# A whole pipeline in a subprocess: left out of the fast loop (launch/test.sh --fast).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STAGES = ("pretrain", "finetune", "distill", "baseline")

BLOCK_TF_AND_RUN = """
import runpy, sys

sys.modules["tensorflow"] = None
sys.modules["tensorflow_datasets"] = None
sys.argv = ["run_all"] + sys.argv[1:]
runpy.run_module("simclrv2_jax.run_all", run_name="__main__", alter_sys=True)
"""


def test_pipeline_runs_without_tensorflow(tmp_path, fake_data_dir, jax_compile_cache):
    workdir = tmp_path / "no_tf"
    args = [f"--workdir={workdir}", "--finetune.examples_per_class=2"]
    args += [f"--pretrain.{k}={v}" for k, v in TINY_MODEL.items()] + [f"--pretrain.data_dir={fake_data_dir}"]
    for stage in STAGES:
        args += [
            f"--{stage}.train_steps=2",
            f"--{stage}.train_batch_size=16",
            f"--{stage}.eval_batch_size=40",
            f"--{stage}.log_every_steps=1",
        ]
    env = subprocess_env(jax_compile_cache)
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK_TF_AND_RUN, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    for stage in STAGES:
        results = summary["stages"][stage]
        assert results["completed"] and results["final_step"] == 2, stage
        assert results["augment_on_device"] is True, stage  # chosen automatically: no TensorFlow
        assert 0.0 <= summary["test_top1"][stage] <= 1.0, stage
        # The logs still reach TensorBoard (through the tensorboard package's own writer).
        assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / stage)), stage
