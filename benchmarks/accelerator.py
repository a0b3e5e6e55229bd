"""Every accelerator figure in one command, each part within its own time budget.

    python -m benchmarks.accelerator                      # on the accelerator: about 9 minutes
    python -m benchmarks.accelerator --parts=facts,pretrain_r50 --out=/tmp/a.json
    python -m benchmarks.accelerator --smoke              # every part at tiny sizes, on the CPU

Parts, in the order they run (``--parts`` picks some):

* ``facts``: jax / jaxlib / flax / optax / orbax versions, backend, device kind, count and memory.
* ``pretrain_r50``: the pretraining step of R50-1x at 224 px in bfloat16, global batch 256 and 512,
  (a) on synthetic views that are already augmented (the model, NT-Xent and LARS alone) and (b) on
  raw uint8 images augmented inside the step (the default on accelerators); views/s, median and min
  step time, model FLOPs (XLA's cost analysis) and MFU (``--peak_tflops`` or the known devices of
  ``train_step.PEAK_TFLOPS``), and (b)/(a): what the input path costs.
* ``torch_peer``: the PyTorch peer (``--torch_peer_script``, eager and ``torch.compile``, batch 256),
  when PyTorch with CUDA is importable; otherwise the reason it was skipped.
* ``pretrain_r50_2x_sk1``: R50-2x-SK1 in bfloat16, batch 256, (a) and (b).
* ``fashion_mnist``: pretraining, fine-tuning on 1% of the labels and the supervised-only baseline
  with the ``fashion_mnist_gpu`` presets, end to end (compilation included): test top-1 of both and
  the pretrained k-NN against the raw pixels and the random network.
* ``finetune_distill``: the fine-tuning and distillation steps of R50-1x in bfloat16, batch 512.
* ``pretrain_microbatches``: what ``microbatches`` costs: R50-1x bf16 pretraining at batch 256 in one
  micro-batch against 1,024 in 4 (256 images each, device-augmented), seconds per image and their
  ratio (the extra forward pass of the exact NT-Xent gradient).

Each part runs in a child process with its own time budget (``PARTS``), shortened where the
command's ``--budget_s`` has less left; a part cut short keeps what it had measured and says why.
The JSON (``--out``, default ``benchmarks/results/accelerator_<device>.json``) is rewritten after
every part, with the issue's goals side by side with what was measured. Nothing here imports
TensorFlow: the command runs on an accelerator host with JAX, flax, optax and orbax, plus the small
wheels ``launch/accelerator.sh`` carries there (ml_collections, clu, dm-pix).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

# Seconds each part may take on the accelerator (compilation included), in the order they run.
PARTS: dict[str, int] = {
    "facts": 60,
    "pretrain_r50": 170,
    "torch_peer": 110,
    "pretrain_r50_2x_sk1": 90,
    "fashion_mnist": 300,
    "finetune_distill": 120,
    "pretrain_microbatches": 120,
}
SMOKE_PART_S = 240  # each part's budget with --smoke, on the CPU

# What each figure is measured against (the targets), read off the finished JSON.
GOALS = (
    ("R50-1x bf16 batch 512 views/s (device-augmented)", 6500.0, ("pretrain_r50", "views_per_s")),
    ("our views/s over the torch.compile peer at batch 256", 1.15, ("torch_peer", "ratio_to_compile")),
    ("device-augmented over synthetic-input step (worst batch)", 0.9, ("pretrain_r50", "input_ratio_min")),
    ("R50-2x-SK1 bf16 batch 256 views/s (device-augmented)", 2300.0, ("pretrain_r50_2x_sk1", "views_per_s")),
    ("Fashion-MNIST fine-tuned on 600 labels, test top-1", 0.86, ("fashion_mnist", "finetune_top1")),
)


@dataclasses.dataclass
class Settings:
    """The sizes of a run: the accelerator's, or the CPU smoke's tiny ones (same parts, same keys)."""

    smoke: bool
    image_size: int
    batches: tuple[int, int]  # pretraining R50-1x: the paper-like small and large global batches
    sk_batch: int
    ft_batch: int
    peer_batch: int
    steps: int
    model: dict[str, Any]
    sk_model: dict[str, Any]
    dtype: str = "bfloat16"

    @classmethod
    def of(cls, smoke: bool) -> Settings:
        if smoke:
            tiny = dict(resnet_depth=10, block_counts=(1, 1, 1, 1), width_multiplier=0.25, sk_ratio=0.0)
            return cls(True, 32, (8, 16), 8, 16, 8, 2, tiny, {**tiny, "sk_ratio": 0.0625})
        from simclrv2_jax.config import fields

        return cls(
            False, 224, (256, 512), 256, 512, 256, 10,
            fields.model_preset("r50_1x_sk0"), fields.model_preset("r50_2x_sk1"),
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# The parts. Each takes the settings and the command's arguments and fills ``out`` (a dict that is
# written to the part's file after every measurement, so a part cut short keeps what it had).


def part_facts(s: Settings, args, out: dict, save: Callable[[], None]) -> None:
    from importlib import metadata

    import jax

    from benchmarks.common import cpu_info

    versions = {}
    packages = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml_collections", "clu")
    packages += ("dm-pix",)
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    device = jax.devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # not every backend reports it
        stats = {}
    out.update(
        versions=versions,
        backend=jax.default_backend(),
        device_kind=device.device_kind,
        device_count=jax.device_count(),
        device_memory_gib=stats["bytes_limit"] / 2**30 if "bytes_limit" in stats else None,
        cpu=cpu_info(),
        python=sys.version.split()[0],
        tensorflow_importable=importlib.util.find_spec("tensorflow") is not None,
    )


def _pretrain_config(s: Settings, model: dict[str, Any], batch: int):
    from simclrv2_jax import config as config_lib

    config = config_lib.get_config("pretrain", "imagenet")
    config.update(model)
    config.image_size = s.image_size
    config.train_batch_size = batch
    config.compute_dtype = s.dtype
    config.train_steps = 1000
    config.augment_on_device = True
    return config


def _time(task, config, mesh, steps: int, peak: float) -> dict:
    from benchmarks.train_step import step_batch, time_step

    return time_step(task, config, mesh, step_batch(task, config, config.train_batch_size), steps, peak)


def _pretrain_rows(s: Settings, args, out: dict, save, model: dict[str, Any], batches) -> None:
    """Rows of (a) synthetic views and (b) device-augmented raw images per batch, and (b)/(a)."""
    from benchmarks.train_step import synthetic_source
    from simclrv2_jax.train import parallel, pretrain

    mesh = parallel.create_mesh()
    out.setdefault("rows", [])
    out.setdefault("input_ratio", {})
    for batch in batches:
        config = _pretrain_config(s, model, batch)
        augmented = pretrain.build(config, mesh, source=synthetic_source(config))
        # (a): the same step without its augmentation, fed float views as if augmented already.
        synthetic = dataclasses.replace(augmented, augment=None, augment_on_device=False)
        by_input = {}
        for name, task in (("synthetic", synthetic), ("device_augmented", augmented)):
            row = {"input": name, **_time(task, config, mesh, s.steps, args.peak_tflops)}
            row["views_per_s"] = row["images_per_s"]
            out["rows"].append(row)
            by_input[name] = row["views_per_s"]
            save()
        out["input_ratio"][str(batch)] = by_input["device_augmented"] / by_input["synthetic"]
        out["input_ratio_min"] = min(out["input_ratio"].values())
        # The device-augmented step (the default) at the largest batch: the goal's figure.
        out["views_per_s"] = by_input["device_augmented"]
        out["global_batch"] = batch
        save()


def part_pretrain_r50(s: Settings, args, out: dict, save) -> None:
    _pretrain_rows(s, args, out, save, s.model, list(s.batches))


def part_pretrain_r50_2x_sk1(s: Settings, args, out: dict, save) -> None:
    _pretrain_rows(s, args, out, save, s.sk_model, [s.sk_batch])


def part_torch_peer(s: Settings, args, out: dict, save) -> None:
    from benchmarks.train_step import run_torch_peer

    reason = _torch_unavailable(args.torch_peer_script)
    if reason:
        out["skipped"] = reason
        return
    out["batch_images"] = s.peer_batch
    out.update(run_torch_peer(args.torch_peer_script, s.peer_batch, ["eager", "compile"]))
    ours = _ours_at(args, s.peer_batch)
    if ours:
        out["ours_synthetic_views_per_s"] = ours
        for kind in ("eager", "compile"):
            if "views_per_s" in out.get(kind, {}):
                out[f"ratio_to_{kind}"] = ours / out[kind]["views_per_s"]


def _torch_unavailable(script: str) -> str | None:
    if not os.path.exists(script):
        return f"the peer script {script} is not here (--torch_peer_script)"
    try:
        import torch
    except ImportError:
        return "PyTorch is not importable here"
    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA device (the peer runs on CUDA only)"
    return None


def _ours_at(args, batch: int) -> float | None:
    """This project's synthetic-input views/s at ``batch`` from the pretrain_r50 part, when it ran:
    the peer times its step on ready-made views as well."""
    try:
        with open(args.out) as f:
            rows = json.load(f)["parts"]["pretrain_r50"]["rows"]
    except (OSError, KeyError, ValueError):
        return None
    match = [r for r in rows if r["input"] == "synthetic" and r["global_batch"] == batch]
    return match[0]["views_per_s"] if match else None


def part_finetune_distill(s: Settings, args, out: dict, save) -> None:
    from benchmarks.train_step import synthetic_source
    from simclrv2_jax import config as config_lib
    from simclrv2_jax.train import distill, finetune, loop, parallel

    mesh = parallel.create_mesh()

    def configured(stage: str, presets: str):
        config = config_lib.get_config(stage, presets)
        config.update(s.model)
        config.image_size = s.image_size
        config.train_batch_size = s.ft_batch
        config.eval_batch_size = s.ft_batch
        config.compute_dtype = s.dtype
        config.train_steps = 1000
        config.augment_on_device = True
        config.label_fraction = 1.0  # every synthetic label (ImageNet's 1% list is not here)
        return config

    config = configured("finetune", "imagenet")
    config.checkpoint = ""
    task = finetune.build(config, mesh, source=synthetic_source(config))
    out["finetune"] = _time(task, config, mesh, s.steps, args.peak_tflops)
    save()
    with tempfile.TemporaryDirectory() as teacher_dir:
        # A teacher to distil: the fine-tuning model after one step, saved as the loop saves runs.
        config.train_steps = 1
        loop.run(finetune.build(config, mesh, source=synthetic_source(config)), teacher_dir, mesh=mesh)
        student = configured("distill", "imagenet")
        student.teacher_checkpoint = teacher_dir
        task = distill.build(student, mesh, source=synthetic_source(student))
        out["distill"] = _time(task, student, mesh, s.steps, args.peak_tflops)
    save()


def part_fashion_mnist(s: Settings, args, out: dict, save) -> None:
    from simclrv2_jax import config as config_lib
    from simclrv2_jax.train.pipeline import run_pipeline, stage_configs

    presets = {
        "pretrain": ("pretrain", "fashion_mnist_gpu"),
        "finetune": ("finetune", "fashion_mnist_gpu"),
        "distill": ("distill", "fashion_mnist"),
        "baseline": ("finetune", "fashion_mnist_gpu,baseline"),
    }
    configs = {name: config_lib.get_config(*p) for name, p in presets.items()}
    if args.data_dir:
        configs["pretrain"].data_dir = args.data_dir
    if s.smoke:
        for config in configs.values():
            config.update(dict(s.model, train_steps=2, train_batch_size=16, eval_batch_size=250))
            config.log_every_steps = 1
        configs["pretrain"].knn_bank_size = 500
    workdir = args.workdir or tempfile.mkdtemp(prefix="fashion_mnist_gpu_")
    t0 = time.time()
    stages = ["pretrain", "finetune", "baseline"]
    summary = run_pipeline(stage_configs(*(configs[n] for n in presets), workdir), workdir, stages)
    out.update(
        workdir=workdir,
        wall_time_s=time.time() - t0,
        stage_wall_time_s={n: summary["stages"][n].get("stage_wall_time_s") for n in stages},
        finetune_top1=summary["test_top1"].get("finetune"),
        baseline_top1=summary["test_top1"].get("baseline"),
        knn_top1=summary.get("knn_top1"),
        labels=summary["labels"],
        pretrain={k: configs["pretrain"][k] for k in ("train_epochs", "train_batch_size", "temperature")},
    )


def part_pretrain_microbatches(s: Settings, args, out: dict, save) -> None:
    from benchmarks.train_step import synthetic_source
    from simclrv2_jax.train import parallel, pretrain

    mesh = parallel.create_mesh()
    out["rows"] = []
    per_micro = s.batches[0]
    for k in (1, 4):
        config = _pretrain_config(s, s.model, per_micro * k)
        config.microbatches = k
        task = pretrain.build(config, mesh, source=synthetic_source(config))
        row = {"microbatches": k, **_time(task, config, mesh, s.steps, args.peak_tflops)}
        row["seconds_per_image"] = row["step_s_median"] / row["global_batch"]
        out["rows"].append(row)
        save()
    plain, micro = (r["seconds_per_image"] for r in out["rows"])
    out["cost_per_image_ratio"] = micro / plain


# ------------------------------------------------------------------------------------------------
# The command: one child process per part, the JSON rewritten after each.


def default_out() -> str:
    import jax

    kind = jax.devices()[0].device_kind.replace(" ", "_").replace("/", "_")
    return os.path.join(os.path.dirname(__file__), "results", f"accelerator_{kind}.json")


def run_child(name: str, args) -> None:
    """In the child: runs one part, writing what it has to ``args._part_out`` after each figure."""
    s = Settings.of(args.smoke)
    out: dict[str, Any] = {}

    def save() -> None:
        with open(args._part_out + ".tmp", "w") as f:
            json.dump(out, f, indent=2, default=str)
        os.replace(args._part_out + ".tmp", args._part_out)

    globals()[f"part_{name}"](s, args, out, save)
    save()


def run_part(name: str, args, budget_s: float) -> dict:
    """A part in a child process within ``budget_s``: what it wrote, with its time and any failure."""
    with tempfile.TemporaryDirectory() as tmp:
        part_out = os.path.join(tmp, "part.json")
        command = [sys.executable, "-m", "benchmarks.accelerator", f"--_part={name}"]
        command.append(f"--_part_out={part_out}")
        for field in ("out", "peak_tflops", "data_dir", "workdir", "torch_peer_script"):
            command.append(f"--{field}={getattr(args, field)}")
        command += ["--smoke"] if args.smoke else []
        t0 = time.time()
        failure = None
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=budget_s, check=False)
            if proc.returncode != 0:
                failure = f"exit status {proc.returncode}: {proc.stderr[-1200:]}"
        except subprocess.TimeoutExpired:
            failure = f"stopped at its budget of {budget_s:.0f} s"
        try:
            with open(part_out) as f:
                result = json.load(f)
        except (OSError, ValueError):
            result = {}
    result["part_wall_time_s"] = time.time() - t0
    if failure:
        result["error"] = failure
    return result


def goals(parts: dict[str, dict]) -> list[dict]:
    rows = []
    for goal, target, (part, key) in GOALS:
        measured = parts.get(part, {}).get(key)
        rows.append(
            {
                "goal": goal,
                "target": target,
                "measured": measured,
                "met": None if measured is None else measured >= target,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default=None, help="the JSON, or a folder for it (default results/accelerator_<device>.json)"
    )
    parser.add_argument("--parts", default=",".join(PARTS), help=f"some of {','.join(PARTS)}")
    parser.add_argument("--smoke", action="store_true", help="every part at tiny sizes (the CPU)")
    parser.add_argument("--budget_s", type=float, default=560.0, help="the whole command's seconds")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="the device's peak for MFU")
    parser.add_argument("--data_dir", default="", help="Fashion-MNIST's IDX files (default: the package's)")
    parser.add_argument("--workdir", default="", help="the fashion_mnist part's pipeline folder")
    parser.add_argument(
        "--torch_peer_script",
        default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench", "torch_peer.py"),
    )
    parser.add_argument("--_part", default="", help=argparse.SUPPRESS)
    parser.add_argument("--_part_out", default="", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args._part:
        run_child(args._part, args)
        return 0
    chosen = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PARTS]
    if unknown:
        known = ",".join(PARTS)
        print(f"error: --parts has unknown part(s) {unknown}; choose from {known}.", file=sys.stderr)
        return 2
    args.out = args.out or default_out()
    if os.path.isdir(args.out):  # a folder: the default file name in it
        args.out = os.path.join(args.out, os.path.basename(default_out()))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    t0 = time.time()
    result: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.accelerator", *argv]),
        "smoke": args.smoke,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "parts": {},
    }
    for name in (p for p in PARTS if p in chosen):  # always in the order of PARTS
        left = args.budget_s - (time.time() - t0)
        budget = min(SMOKE_PART_S if args.smoke else PARTS[name], left)
        if budget < 10:
            result["parts"][name] = {"skipped": f"the command's --budget_s={args.budget_s:g} was spent"}
        else:
            print(f"[accelerator] {name} (within {budget:.0f} s) ...", flush=True)
            result["parts"][name] = run_part(name, args, budget)
        result["goals"] = goals(result["parts"])
        result["wall_time_s"] = time.time() - t0
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)
        part = result["parts"][name]
        print(f"[accelerator] {name}: " + (part.get("error") or part.get("skipped") or "done"), flush=True)
    for row in result["goals"]:
        print(f"  {row['goal']}: target {row['target']:g}, measured {row['measured']}")
    print(f"Wrote {args.out} in {result['wall_time_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
