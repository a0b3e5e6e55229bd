"""The CPU convolution dispatcher picks each layer's paths by measurement (``models/conv_autotune.py``).

The dispatch logic is tested with injected timings and an injected clock: which candidate wins, what
is stored and recalled, per machine, and what happens once the measuring budget is spent. Then the
real thing on tiny layers: measured inside a ``jit`` trace, the chosen methods are the ones run, and
the gradients are XLA's.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclrv2_jax.models import conv as conv_lib
from simclrv2_jax.models import conv_autotune as tune
from simclrv2_jax.models.conv_autotune import Autotuner, Layer

MACHINE = {"cpu": "test CPU", "simd": ["avx2"], "xla_cpu_flags": [], "jax": "x", "jaxlib": "x"}
STRIDED = Layer((4, 9, 9, 8), (3, 3, 8, 16), (2, 2), ((1, 1), (1, 1)), "float32")
PLAIN = Layer((4, 9, 9, 8), (3, 3, 8, 8), (1, 1), ((1, 1), (1, 1)), "float32")
ONE_BY_ONE = Layer((4, 9, 9, 8), (1, 1, 8, 16), (1, 1), ((0, 0), (0, 0)), "float32")


class FakeMeasure:
    """Timings from a table; each call advances a fake clock by ``cost`` seconds."""

    def __init__(self, table, clock=None, cost=0.0):
        self.table, self.clock, self.cost, self.calls = table, clock, cost, []

    def __call__(self, layer, direction, method):
        self.calls.append((layer.key, direction, method))
        if self.clock is not None:
            self.clock.now += self.cost
        return self.table[(layer.key, direction, method)]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def rules(layer):
    return {"conv": "matmul"} if layer.one_by_one else {"dx": "xla", "dw": "xla"}


def make(tmp_path, measure, **kwargs):
    kwargs.setdefault("fingerprint", MACHINE)
    kwargs.setdefault("budget_s", 100.0)
    return Autotuner(measure=measure, fallback=rules, cache_path=str(tmp_path / "plans.json"), **kwargs)


def test_candidates_per_layer_kind():
    assert tune.candidates(STRIDED) == {"dx": ("xla", "subpixel"), "dw": ("xla", "taps")}
    assert tune.candidates(PLAIN) == {"dx": ("xla",), "dw": ("xla", "taps")}
    assert tune.candidates(ONE_BY_ONE) == {"conv": ("matmul", "xla")}


def test_the_fastest_candidate_wins_and_is_recalled_without_measuring(tmp_path):
    table = {
        (STRIDED.key, "dx", "xla"): 3.0,
        (STRIDED.key, "dx", "subpixel"): 1.0,
        (STRIDED.key, "dw", "xla"): 1.0,
        (STRIDED.key, "dw", "taps"): 2.0,
        (PLAIN.key, "dw", "xla"): 5.0,
        (PLAIN.key, "dw", "taps"): 4.0,
        (ONE_BY_ONE.key, "conv", "matmul"): 2.0,
        (ONE_BY_ONE.key, "conv", "xla"): 1.0,
    }
    measure = FakeMeasure(table)
    tuner = make(tmp_path, measure)
    assert tuner.choose(STRIDED) == {"dx": "subpixel", "dw": "xla"}
    assert tuner.choose(PLAIN) == {"dx": "xla", "dw": "taps"}  # one dx candidate: not timed
    assert tuner.choose(ONE_BY_ONE) == {"conv": "xla"}
    assert (PLAIN.key, "dx", "xla") not in measure.calls and len(measure.calls) == 4 + 2 + 2
    assert tuner.choose(STRIDED) == {"dx": "subpixel", "dw": "xla"} and len(measure.calls) == 8

    stored = json.loads((tmp_path / "plans.json").read_text())
    section = stored["machines"][tune.machine_key(MACHINE)]
    assert section["fingerprint"] == MACHINE
    assert section["layers"][STRIDED.key]["seconds"]["dx"] == {"xla": 3.0, "subpixel": 1.0}

    # Another process on the same machine: recalled from the file, nothing measured.
    def never(*args):
        raise AssertionError("measured again")

    again = make(tmp_path, never)
    assert again.choose(STRIDED) == {"dx": "subpixel", "dw": "xla"}
    assert again.choose(ONE_BY_ONE) == {"conv": "xla"}
    # Another kind of machine (here: AVX-512 emulated away) measures for itself, in its own section.
    other = make(
        tmp_path, FakeMeasure(table), fingerprint={**MACHINE, "xla_cpu_flags": ["--xla_cpu_max_isa=AVX2"]}
    )
    other.choose(PLAIN)
    assert other.measured == 1
    assert len(json.loads((tmp_path / "plans.json").read_text())["machines"]) == 2


def test_a_choice_another_process_stored_meanwhile_is_taken(tmp_path):
    """Two runs of one job must compute the same thing: a layer another process measured after this
    one read the cache is taken from the file, not measured again (which could choose otherwise)."""
    table = {(PLAIN.key, "dw", "xla"): 1.0, (PLAIN.key, "dw", "taps"): 2.0}
    first = make(tmp_path, FakeMeasure(table))
    assert first.plans() == {}  # read the (empty) file
    make(tmp_path, FakeMeasure({k: 3.0 - v for k, v in table.items()})).choose(PLAIN)  # chose taps

    def never(*args):
        raise AssertionError("measured although another process had chosen")

    first.measure = never
    assert first.choose(PLAIN) == {"dx": "xla", "dw": "taps"}


def test_a_spent_budget_falls_back_to_the_rules_and_stores_that(tmp_path):
    clock = Clock()
    table = {(PLAIN.key, "dw", m): t for m, t in (("xla", 2.0), ("taps", 1.0))}
    table.update({(STRIDED.key, d, m): 1.0 for d in ("dx", "dw") for m in ("xla", "subpixel", "taps")})
    measure = FakeMeasure(table, clock=clock, cost=10.0)
    tuner = make(tmp_path, measure, budget_s=15.0, clock=clock)
    assert tuner.choose(PLAIN) == {"dx": "xla", "dw": "taps"}  # measured: 20 s of the 15 spent
    assert tuner.spent_s == 20.0
    assert tuner.choose(STRIDED) == {"dx": "xla", "dw": "xla"}  # the rules
    assert all(call[0] == PLAIN.key for call in measure.calls)
    entry = json.loads((tmp_path / "plans.json").read_text())["machines"][tune.machine_key(MACHINE)]
    assert entry["layers"][STRIDED.key]["source"].startswith("rules")
    # Later runs compute the same thing: the rules' choice is recalled, not measured.
    later = make(tmp_path, FakeMeasure({}), budget_s=1000.0)
    assert later.choose(STRIDED) == {"dx": "xla", "dw": "xla"} and later.measured == 0


def test_a_damaged_cache_is_ignored_and_rewritten(tmp_path):
    (tmp_path / "plans.json").write_text("{not json")
    tuner = make(tmp_path, FakeMeasure({(PLAIN.key, "dw", "xla"): 1.0, (PLAIN.key, "dw", "taps"): 2.0}))
    assert tuner.choose(PLAIN) == {"dx": "xla", "dw": "xla"}
    assert PLAIN.key in json.dumps(json.loads((tmp_path / "plans.json").read_text()))


def test_bad_settings_name_the_variable(monkeypatch):
    monkeypatch.setenv(conv_lib.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="SIMCLR_FAST_CPU_CONV='fast'"):
        conv_lib.cpu_conv_mode()
    monkeypatch.setenv(tune.BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match="SIMCLR_CONV_AUTOTUNE_BUDGET_S='lots'"):
        tune._budget_from_env()


# ------------------------------------------------------------------------------------------------
# conv2d in measuring mode.


def _grads(conv, x, kernel):
    return jax.jit(jax.grad(lambda a, b: jnp.sum(conv(a, b) ** 2), argnums=(0, 1)))(x, kernel)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(4, 9, 9, 8)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 8, 16)) / 8, jnp.float32)
    return x, kernel


@pytest.mark.parametrize("choice", [{"dx": "subpixel", "dw": "taps"}, {"dx": "xla", "dw": "xla"}])
def test_conv2d_runs_the_chosen_backward_methods(monkeypatch, tmp_path, choice):
    monkeypatch.delenv(conv_lib.ENV_VAR, raising=False)
    used = []
    real_taps, real_subpixel = conv_lib._weight_grad_taps, conv_lib._input_grad_subpixel
    monkeypatch.setattr(conv_lib, "_weight_grad_taps", lambda *a: used.append("taps") or real_taps(*a))
    monkeypatch.setattr(
        conv_lib, "_input_grad_subpixel", lambda *a: used.append("subpixel") or real_subpixel(*a)
    )

    class Fixed:
        def choose(self, layer):
            # A batch of 4 does not split over the 8 devices: measured whole.
            assert layer.x_shape == (4, 9, 9, 8) and layer.strides == (2, 2)
            return dict(choice)

    monkeypatch.setattr(tune, "tuner", lambda measure, fallback: Fixed())
    x, kernel = _inputs()
    conv = lambda a, b: conv_lib.conv2d(a, b, strides=(2, 2), padding=((1, 1), (1, 1)))
    xla = lambda a, b: conv_lib.xla_conv2d(a, b, strides=(2, 2), padding=((1, 1), (1, 1)))
    # Forward only (evaluation): nothing chosen, nothing measured.
    np.testing.assert_allclose(jax.jit(conv)(x, kernel), xla(x, kernel), rtol=1e-5, atol=1e-5)
    assert used == []
    for got, want in zip(_grads(conv, x, kernel), _grads(xla, x, kernel)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert sorted(used) == sorted(m for m in choice.values() if m != "xla")


def test_the_batch_measured_is_one_device_share():
    x = jnp.zeros((16, 9, 9, 8))
    kernel = jnp.zeros((3, 3, 8, 8))
    layer = conv_lib.measured_layer(x, kernel, (1, 1), ((1, 1), (1, 1)))
    assert jax.device_count() == 8 and layer.x_shape == (2, 9, 9, 8)
    assert conv_lib.measured_layer(jnp.zeros((5, 9, 9, 8)), kernel, (1, 1), ((1, 1), (1, 1))).x_shape[0] == 5


def test_real_measurement_inside_a_jit_trace(monkeypatch, tmp_path):
    """No injection: the layer is timed on concrete arrays while the step is being traced, the choice
    is stored, and the gradients equal XLA's whatever was chosen."""
    monkeypatch.delenv(conv_lib.ENV_VAR, raising=False)
    monkeypatch.setenv(tune.CACHE_ENV, str(tmp_path / "measured.json"))
    monkeypatch.setattr(tune, "_TUNER", None)
    x, kernel = _inputs(1)
    conv = lambda a, b: conv_lib.conv2d(a, b, strides=(2, 2), padding=((1, 1), (1, 1)))
    xla = lambda a, b: conv_lib.xla_conv2d(a, b, strides=(2, 2), padding=((1, 1), (1, 1)))
    for got, want in zip(_grads(conv, x, kernel), _grads(xla, x, kernel)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    stored = json.loads((tmp_path / "measured.json").read_text())
    (section,) = stored["machines"].values()
    (entry,) = section["layers"].values()
    assert entry["source"] == "measured"
    assert set(entry["seconds"]) == {"dx", "dw"}
    assert all(t > 0 for times in entry["seconds"].values() for t in times.values())
    assert entry["choice"]["dx"] in ("xla", "subpixel") and entry["choice"]["dw"] in ("xla", "taps")


def test_forcing_a_path_skips_measuring(monkeypatch):
    def never(*args):
        raise AssertionError("measured although a path was forced")

    monkeypatch.setattr(tune, "tuner", never)
    x, kernel = _inputs(2)
    for mode in ("0", "heuristic", "taps"):
        monkeypatch.setenv(conv_lib.ENV_VAR, mode)
        conv = lambda a, b: conv_lib.conv2d(a, b, strides=(2, 2), padding=((1, 1), (1, 1)))
        _grads(conv, x, kernel)
