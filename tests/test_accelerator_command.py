"""``python -m benchmarks.accelerator``: the command that measures every accelerator figure, run here
at its smoke sizes on the CPU so that it cannot rot between the rare sessions that have a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env, xla_flags

REPO = Path(__file__).resolve().parents[1]

# Subprocesses of the command: left out of the fast loop (launch/test.sh --fast).
pytestmark = pytest.mark.slow


def run_command(tmp_path, compile_cache, *args, timeout=600):
    out = tmp_path / "accelerator.json"
    env = subprocess_env(compile_cache)
    env["XLA_FLAGS"] = xla_flags(1)  # one CPU device, as on one GPU
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.accelerator", "--smoke", f"--out={out}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_the_smoke_writes_each_part_with_its_figures_and_the_goals(tmp_path, jax_compile_cache):
    result = run_command(tmp_path, jax_compile_cache, "--parts=torch_peer,facts,pretrain_r50_2x_sk1")
    parts = result["parts"]
    assert list(parts) == ["facts", "torch_peer", "pretrain_r50_2x_sk1"]  # in the command's own order
    facts = parts["facts"]
    assert facts["backend"] == "cpu" and facts["device_count"] == 1 and facts["versions"]["jax"]

    sk = parts["pretrain_r50_2x_sk1"]
    assert "error" not in sk, sk.get("error")
    assert [r["input"] for r in sk["rows"]] == ["synthetic", "device_augmented"]
    for row in sk["rows"]:
        assert row["model"]["sk_ratio"] > 0 and row["global_batch"] == 8
        # Two views per image: views/s is 2 x batch over the median step time.
        assert abs(row["views_per_s"] - 2 * 8 / row["step_s_median"]) < 1e-6 * row["views_per_s"]
        assert row["step_s_min"] <= row["step_s_median"]
        assert row["model_flops_per_step"] > 0
    synthetic, augmented = (r["views_per_s"] for r in sk["rows"])
    assert abs(sk["input_ratio"]["8"] - augmented / synthetic) < 1e-9
    assert sk["views_per_s"] == augmented

    peer = parts["torch_peer"]
    assert peer.get("skipped") or "compile" in peer  # no PyTorch with CUDA here: it says why

    goals = {g["goal"]: g for g in result["goals"]}
    assert len(goals) == 5
    sk_goal = goals["R50-2x-SK1 bf16 batch 256 views/s (device-augmented)"]
    assert sk_goal["measured"] == augmented and sk_goal["met"] == (augmented >= 2300)
    assert goals["Fashion-MNIST fine-tuned on 600 labels, test top-1"]["measured"] is None  # not run


def test_a_part_past_its_budget_is_stopped_and_the_json_still_written(
    tmp_path, jax_compile_cache, fake_data_dir
):
    # Three training stages and their evaluations cannot finish in the 12 s the command leaves.
    args = ("--parts=facts,fashion_mnist", "--budget_s=18", f"--data_dir={fake_data_dir}")
    result = run_command(tmp_path, jax_compile_cache, *args)
    assert "error" not in result["parts"]["facts"]
    stopped = result["parts"]["fashion_mnist"]
    assert "budget" in stopped["error"] and stopped["part_wall_time_s"] < 20
    assert os.path.exists(tmp_path / "accelerator.json")
