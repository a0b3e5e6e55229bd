"""What every benchmark writes beside its numbers, and the reuse of finished runs."""

from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Any


def cpu_info() -> dict:
    """The CPU: its model, SIMD flags (AVX, SSE4, FMA, AMX) and the cores available to this process."""
    info = {"cores_available": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        model = next(
            line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")
        )
        flags = next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags"))
        info["model"] = model
        info["simd"] = sorted(f for f in flags if f.startswith(("avx", "sse4", "fma", "amx")))
    except (OSError, StopIteration):
        pass
    return info


def machine() -> dict[str, Any]:
    """The machine a result was measured on: CPU model and SIMD flags, backend, devices, versions."""
    import jax

    return {
        **cpu_info(),
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "python": platform.python_version(),
    }


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def finished(workdir: str) -> dict[str, Any] | None:
    """The results of a run that already completed in ``workdir`` (so a benchmark can resume)."""
    try:
        with open(os.path.join(workdir, "results.json")) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return None
    return results if results.get("completed") else None


def write(path: str, report: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path}")


def train_or_reuse(workdir: str, stage: str, presets: str, **fields: Any) -> dict[str, Any]:
    """The results of the stage config ``stage:presets`` with ``fields`` set, trained in ``workdir``,
    or those of the run that already finished there (so a benchmark resumes without retraining)."""
    from simclrv2_jax.config import get_config
    from simclrv2_jax.train import train_stage

    done = finished(workdir)
    if done is not None:
        return done
    config = get_config(stage, presets)
    for name, value in fields.items():
        config[name] = value
    results = train_stage(config, workdir)
    results.pop("state", None)
    return results
