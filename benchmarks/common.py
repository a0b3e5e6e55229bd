"""What every benchmark writes beside its numbers, and the reuse of finished runs."""

from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Any


def machine() -> dict[str, Any]:
    """The machine a result was measured on: CPU model and SIMD flags, backend, devices, versions."""
    import jax

    from benchmarks.input_pipeline import cpu_info

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
