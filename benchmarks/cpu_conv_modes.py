"""The CPU train step with each convolution path, natively and with AVX2 emulated.

    python -m benchmarks.cpu_conv_modes                         # the default job's pretraining step
    python -m benchmarks.cpu_conv_modes --batch=256 --steps=5 --isas=native

Runs ``benchmarks.train_step`` once per (instruction set, ``SIMCLR_FAST_CPU_CONV`` mode) in a fresh
process: ``measure`` (the default: each layer's paths timed on this machine, ``conv_autotune.py``),
``heuristic`` (the fixed rules), ``taps`` (taps for every weight gradient) and ``xla`` (XLA's own
convolution). ``--isas=native,AVX2`` also runs them with ``XLA_FLAGS=--xla_cpu_max_isa=AVX2``, which
makes XLA generate code for an AVX2-only CPU on this one (the matmul libraries it calls may still use
wider instructions: an emulation, not an AVX2 machine). The measured mode starts from an empty plan
cache, so its first step includes the measuring (``compile_and_first_step_s``); a second run of it
(``measure (cached)``) shows the start-up once the plans are stored. Writes
``benchmarks/results/train_step_cpu_conv.json`` with the machine's CPU and SIMD flags.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

from benchmarks.input_pipeline import cpu_info

MODES = {"measure": "1", "heuristic": "heuristic", "taps": "taps", "xla": "0"}
ISAS = {"native": "", "AVX2": "--xla_cpu_max_isa=AVX2"}


def run(stage: str, preset: str, batch: int, steps: int, mode: str, isa: str, cache: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = dict(os.environ, SIMCLR_FAST_CPU_CONV=MODES[mode], SIMCLR_CONV_CACHE=cache, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = " ".join(x for x in (os.environ.get("XLA_FLAGS", ""), ISAS[isa]) if x)
    command = [
        sys.executable,
        "-m",
        "benchmarks.train_step",
        f"--stage={stage}",
        f"--preset={preset}",
        f"--batch={batch}",
        f"--steps={steps}",
        f"--out={out}",
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode}/{isa} failed:\n{proc.stderr[-3000:]}")
    with open(out) as f:
        result = json.load(f)
    os.unlink(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", default="pretrain")
    parser.add_argument("--preset", default="fashion_mnist")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--modes", default="measure,heuristic,taps,xla")
    parser.add_argument("--isas", default="native,AVX2")
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "train_step_cpu_conv.json")
    )
    args = parser.parse_args()
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": cpu_info(),
        "stage": args.stage,
        "preset": args.preset,
        "global_batch": args.batch,
        "timed_steps": args.steps,
        "results": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for isa in args.isas.split(","):
            cache = os.path.join(tmp, f"plans_{isa}.json")
            rows = {}
            for mode in args.modes.split(","):
                result = run(args.stage, args.preset, args.batch, args.steps, mode, isa, cache)
                rows[mode] = {
                    "step_s_median": result["step_s_median"],
                    "step_s_min": result["step_s_min"],
                    "images_per_s": result["images_per_s"],
                    "compile_and_first_step_s": result["compile_and_first_step_s"],
                }
                if mode == "measure":
                    again = run(args.stage, args.preset, args.batch, args.steps, mode, isa, cache)
                    rows["measure (cached)"] = {
                        "step_s_median": again["step_s_median"],
                        "step_s_min": again["step_s_min"],
                        "images_per_s": again["images_per_s"],
                        "compile_and_first_step_s": again["compile_and_first_step_s"],
                    }
                    with open(cache) as f:
                        (section,) = json.load(f)["machines"].values()
                    rows["measured_choices"] = {k: v["choice"] for k, v in section["layers"].items()}
                print(isa, mode, f"{result['step_s_median']:.3f} s/step", flush=True)
            xla = rows.get("xla", {}).get("step_s_median")
            if xla:
                for row in rows.values():
                    if "step_s_median" in row:
                        row["speedup_vs_xla"] = xla / row["step_s_median"]
            report["results"][isa] = rows
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
