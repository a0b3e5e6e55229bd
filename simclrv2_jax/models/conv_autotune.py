"""Which CPU convolution path each layer takes, chosen by measuring them on the machine itself.

``models/conv.py`` has several ways to compute a convolution's input gradient (dx: XLA's, or
"subpixel" for strided convs), its weight gradient (dw: XLA's, or "taps") and a 1x1 conv (XLA's
conv, or one matmul). Which is fastest depends on the layer and even more on the machine: the same
2-core job runs 3x slower on an AVX2-only CPU than on an AVX-512 one, and the fast path on one is
not the fast path on the other. So nothing is assumed: the first time a layer shape is
differentiated, each candidate is compiled and timed on the CPU (a few calls each, the best kept),
the fastest is used, and the choice is stored on disk so that later runs (and a resumed run) take
the same paths without measuring again.

* The cache: ``SIMCLR_CONV_CACHE`` (a JSON file; default ``~/.cache/simclrv2_jax/conv_plans.json``),
  one section per machine fingerprint (CPU model, SIMD flags, XLA's CPU flags, JAX version), so a
  shared home directory serves several machines and a cache never crosses to another machine kind.
* The time bound: ``SIMCLR_CONV_AUTOTUNE_BUDGET_S`` seconds of measuring per process (default
  120). Once spent, layers not yet measured take the fixed rules of ``conv.cpu_plan`` and that
  choice is stored too, so every later run of the same shapes computes exactly the same thing.
* Forcing a path: ``SIMCLR_FAST_CPU_CONV=0`` (XLA's own convolution everywhere), ``=taps`` (taps for
  every kxk weight gradient), ``=heuristic`` (the fixed rules, no measuring); unset or ``1``: measured.

Measurements run in a separate thread, so that a layer met while ``jit`` traces a train step is
timed with concrete arrays outside that trace. With several devices (a sharded step) the batch of a
measured layer is divided by the device count: the work one device does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import threading
import time
from collections.abc import Callable
from typing import Any

from absl import logging

CACHE_ENV = "SIMCLR_CONV_CACHE"
BUDGET_ENV = "SIMCLR_CONV_AUTOTUNE_BUDGET_S"
DEFAULT_BUDGET_S = 120.0
# Per candidate: calls timed after the compiling call, and the time after which no more are made.
_MAX_CALLS = 5
_MAX_SECONDS_PER_CANDIDATE = 2.0


@dataclasses.dataclass(frozen=True)
class Layer:
    """A convolution as the backward pass sees it (shapes of the work one device does)."""

    x_shape: tuple[int, ...]
    kernel_shape: tuple[int, ...]
    strides: tuple[int, int]
    pads: tuple[tuple[int, int], tuple[int, int]]
    dtype: str

    @property
    def key(self) -> str:
        (pt, pb), (pl, pr) = self.pads
        x = "x".join(map(str, self.x_shape))
        k = "x".join(map(str, self.kernel_shape))
        return f"x{x} k{k} s{self.strides[0]}x{self.strides[1]} p{pt},{pb},{pl},{pr} {self.dtype}"

    @property
    def one_by_one(self) -> bool:
        return tuple(self.kernel_shape[:2]) == (1, 1)


def candidates(layer: Layer) -> dict[str, tuple[str, ...]]:
    """What can be chosen for ``layer``: per direction, the methods to time."""
    if layer.one_by_one:
        return {"conv": ("matmul", "xla")}
    dx = ("xla", "subpixel") if layer.strides != (1, 1) else ("xla",)
    return {"dx": dx, "dw": ("xla", "taps")}


def _cpu_flags() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = sorted(
                        x for x in line.split(":", 1)[1].split() if x.startswith(("avx", "fma", "amx"))
                    )
    except OSError:
        pass
    return model, flags


def machine_fingerprint() -> dict[str, Any]:
    """What decides which path is fastest: the CPU, its SIMD flags, XLA's CPU options, JAX."""
    import jax
    import jaxlib

    model, flags = _cpu_flags()
    xla_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f.startswith("--xla_cpu")]
    return {
        "cpu": model,
        "simd": flags,
        "xla_cpu_flags": sorted(xla_flags),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
    }


def machine_key(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_path() -> str:
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "simclrv2_jax", "conv_plans.json")


def _budget_from_env() -> float:
    value = os.environ.get(BUDGET_ENV)
    if value is None:
        return DEFAULT_BUDGET_S
    try:
        return max(0.0, float(value))
    except ValueError:
        raise ValueError(
            f"{BUDGET_ENV}={value!r} is not a number of seconds (e.g. 120, or 0 to never measure)."
        ) from None


def time_call(fn: Callable[[], Any], block: Callable[[Any], Any]) -> float:
    """Best seconds of ``fn()`` over a few calls after a first (compiling) one."""
    block(fn())
    best = float("inf")
    start = time.perf_counter()
    for _ in range(_MAX_CALLS):
        t0 = time.perf_counter()
        block(fn())
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > _MAX_SECONDS_PER_CANDIDATE:
            break
    return best


class Autotuner:
    """Chooses, stores and recalls each layer's paths (see the module docstring).

    ``measure(layer, direction, method) -> seconds`` times one candidate; ``fallback(layer) ->
    {direction: method}`` is the choice once the budget is spent. Both are injectable (tests).
    """

    def __init__(
        self,
        *,
        measure: Callable[[Layer, str, str], float],
        fallback: Callable[[Layer], dict[str, str]],
        cache_path: str | None = None,
        budget_s: float | None = None,
        fingerprint: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.measure = measure
        self.fallback = fallback
        self.cache_path = cache_path or default_cache_path()
        self.budget_s = _budget_from_env() if budget_s is None else budget_s
        self.fingerprint = fingerprint or machine_fingerprint()
        self.machine = machine_key(self.fingerprint)
        self.clock = clock
        self.spent_s = 0.0
        self.measured = 0  # layers measured by this process
        self._lock = threading.Lock()
        self._plans: dict[str, dict[str, Any]] | None = None

    # -- the cache file ------------------------------------------------------------------------
    def _read_file(self) -> dict[str, Any]:
        try:
            with open(self.cache_path) as f:
                data = json.load(f)
            if not isinstance(data, dict) or not isinstance(data.get("machines", {}), dict):
                raise ValueError("not a cache of this module")
            return data
        except FileNotFoundError:
            return {"machines": {}}
        except (OSError, ValueError) as e:
            logging.warning(
                "Ignoring the convolution plan cache %s (%s); it will be rewritten.", self.cache_path, e
            )
            return {"machines": {}}

    def plans(self) -> dict[str, dict[str, Any]]:
        """This machine's stored choices, by layer key (read once per process)."""
        if self._plans is None:
            section = self._read_file()["machines"].get(self.machine, {})
            self._plans = dict(section.get("layers", {}))
        return self._plans

    def _store(self, key: str, entry: dict[str, Any]) -> None:
        """Adds one layer's choice to the file, keeping what other processes wrote meanwhile."""
        self.plans()[key] = entry
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.cache_path)), exist_ok=True)
            data = self._read_file()
            section = data["machines"].setdefault(
                self.machine, {"fingerprint": self.fingerprint, "layers": {}}
            )
            section.setdefault("layers", {})[key] = entry
            tmp = f"{self.cache_path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.cache_path)
        except OSError as e:  # a read-only home: the choice still holds for this process
            logging.warning("Cannot write the convolution plan cache %s: %s", self.cache_path, e)

    # -- choosing ------------------------------------------------------------------------------
    def choose(self, layer: Layer) -> dict[str, str]:
        """``{direction: method}`` for ``layer``: stored, else measured (in budget), else the rules."""
        with self._lock:
            stored = self.plans().get(layer.key)
            if stored is None:  # another process may have chosen it since this one read the file
                section = self._read_file()["machines"].get(self.machine, {})
                self.plans().update(section.get("layers", {}))
                stored = self.plans().get(layer.key)
            if stored is not None:
                return dict(stored["choice"])
            if self.spent_s >= self.budget_s:
                choice = self.fallback(layer)
                self._store(layer.key, {"choice": choice, "source": "rules (measuring budget spent)"})
                return choice
            start = self.clock()
            seconds: dict[str, dict[str, float]] = {}
            choice = {}
            for direction, methods in candidates(layer).items():
                if len(methods) == 1:
                    choice[direction] = methods[0]
                    continue
                seconds[direction] = {m: self.measure(layer, direction, m) for m in methods}
                choice[direction] = min(methods, key=lambda m: seconds[direction][m])
            self.spent_s += self.clock() - start
            self.measured += 1
            self._store(layer.key, {"choice": choice, "source": "measured", "seconds": seconds})
            logging.info("Convolution %s: %s (measured %s)", layer.key, choice, seconds)
            return choice


_TUNER: Autotuner | None = None
_TUNER_LOCK = threading.Lock()


def tuner(
    measure: Callable[[Layer, str, str], float], fallback: Callable[[Layer], dict[str, str]]
) -> Autotuner:
    """The process's autotuner (created on first use with the environment's settings)."""
    global _TUNER
    with _TUNER_LOCK:
        if _TUNER is None or _TUNER.cache_path != default_cache_path():
            _TUNER = Autotuner(measure=measure, fallback=fallback)
        return _TUNER


def run_outside_trace(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a fresh thread: JAX's tracing state is per thread, so arrays there are concrete."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            result["error"] = e

    thread = threading.Thread(target=target, name="conv-autotune")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]
