"""A sweep's runs: the sweep file loaded, each run's config built and checked, its name and workdir.

Everything here happens before the first run starts, and creates nothing: a mistake in any run
(an unknown field, a value of the wrong type, a value the validation refuses, two runs with the same
config) is one ``SweepError`` naming the run by its index in ``get_sweep()``'s list and its name.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import importlib.util
import json
import os
import re
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from ml_collections.config_flags import config_path

from simclrv2_jax.sweeps import Overrides, SweepError, plain

MAX_NAME_CHARS = 150  # longer names become a readable prefix + a hash of the overrides
PREFIX_CHARS = 100
BASE_NAME = "base"  # the run without overrides (the --config as given)
_UNSAFE = re.compile(r"[^A-Za-z0-9._+\-]")


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a sweep: ``overrides`` holds the values as the config holds them (an int given to a
    float field is that float), ``config`` the whole checked config, ``workdir`` = sweep dir / name."""

    index: int
    name: str
    overrides: Overrides
    config: ml_collections.ConfigDict
    workdir: str

    @property
    def label(self) -> str:
        return f"sweep run {self.index} ({self.name})"

    def value(self, field: str) -> Any:
        """The run's value of ``field`` (dotted), whether the run sets it or the base config does."""
        return config_path.get_value(field, self.config)


# ---------------------------------------------------------------------------------------------------
# The sweep file.


def _where(error: BaseException, path: str) -> str:
    """``NameError: name 'x' is not defined (line 12)``: the error and its line in the sweep file."""
    line = getattr(error, "lineno", None) if isinstance(error, SyntaxError) else None
    for frame in traceback.extract_tb(error.__traceback__):
        if os.path.abspath(frame.filename) == os.path.abspath(path):
            line = frame.lineno
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" + (f" (line {line})" if line else "")


def load_sweep(path: str) -> list[Overrides]:
    """The runs ``get_sweep()`` of the sweep file returns, as a list of override dicts."""
    if not os.path.isfile(path):
        raise SweepError(
            f"the sweep file {path} does not exist. Pass --sweep=FILE.py defining get_sweep(), "
            "e.g. --sweep=configs/sweeps/finetune_lr_selector.py."
        )
    spec = importlib.util.spec_from_file_location("simclrv2_jax_sweep_file", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # whatever the file does wrong, the user gets one line
        raise SweepError(f"the sweep file {path} does not load: {_where(e, path)}.") from None
    get_sweep = getattr(module, "get_sweep", None)
    if not callable(get_sweep):
        raise SweepError(
            f"the sweep file {path} defines no get_sweep(). It must define get_sweep() returning a list "
            "of override dicts, e.g. sweeps.product(learning_rate=[0.1, 0.2]) (see configs/sweeps/)."
        )
    try:
        runs = get_sweep()
    except SweepError as e:
        raise SweepError(f"get_sweep() in {path}: {e}") from None
    except Exception as e:
        raise SweepError(f"get_sweep() in {path} failed: {_where(e, path)}.") from None
    if isinstance(runs, (str, bytes, Mapping)) or not isinstance(runs, Sequence):
        runs_type = type(runs).__name__
        raise SweepError(f"get_sweep() in {path} returned a {runs_type}, not a list of override dicts.")
    for index, run in enumerate(runs):
        if not isinstance(run, Mapping):
            raise SweepError(
                f"sweep run {index}: get_sweep() in {path} gave {run!r}, not an override dict "
                "(field name -> value)."
            )
        for field in run:
            if not isinstance(field, str):
                raise SweepError(f"sweep run {index}: the field name {field!r} is not a string.")
    if not runs:
        raise SweepError(f"the sweep has no runs: get_sweep() in {path} returned an empty list.")
    return [dict(run) for run in runs]


# ---------------------------------------------------------------------------------------------------
# Names.


def _render(value: Any) -> tuple[str, bool]:
    """``(text, exact)``: a value as it appears in a run's name; ``exact`` when nothing was replaced."""
    if value is None or isinstance(value, (bool, int)):
        return str(value), True
    if isinstance(value, float):
        return repr(value), True  # the shortest text that reads back as the same float
    if isinstance(value, (tuple, list)):
        return "_".join(_render(v)[0] for v in value), False
    text = str(value)
    safe = _UNSAFE.sub("_", text)
    return safe, isinstance(value, str) and safe == text


def run_name(overrides: Mapping[str, Any]) -> str:
    """A run's folder name from its overrides, in their order: ``learning_rate=0.1,ft_proj_selector=1``.

    Only ``A-Z a-z 0-9 . _ + - = ,`` appear. A value with other characters (a path, a tuple) has
    them replaced and the name gets ``-`` and 8 hex digits of a hash of the overrides, as does a name
    over ``MAX_NAME_CHARS`` (cut to ``PREFIX_CHARS`` first), so that different runs never share one.
    """
    if not overrides:
        return BASE_NAME
    parts, exact = [], True
    for field, value in overrides.items():
        text, value_exact = _render(value)
        safe_field = _UNSAFE.sub("_", field)
        exact = exact and value_exact and safe_field == field
        parts.append(f"{safe_field}={text}")
    name = ",".join(parts)
    if exact and len(name) <= MAX_NAME_CHARS:
        return name
    digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=repr).encode()).hexdigest()[:8]
    return f"{name[:PREFIX_CHARS].rstrip(',=_')}-{digest}"


# ---------------------------------------------------------------------------------------------------
# Configs.


def _field_names(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    names = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            names += _field_names(value, f"{prefix}{key}.")
        else:
            names.append(f"{prefix}{key}")
    return names


def apply_overrides(
    base: ml_collections.ConfigDict, overrides: Mapping[str, Any], label: str
) -> tuple[ml_collections.ConfigDict, Overrides]:
    """``(config, applied)``: a copy of ``base`` with the overrides set as ``--config.FIELD=VALUE``
    sets them (ml_collections' type check: an int field refuses a str or a float, a float field
    takes an int), and the values as the config now holds them."""
    config = copy.deepcopy(
        base
    )  # keeps the lock and typed fields (FieldReference) that a resolved copy loses
    config.lock()
    applied: Overrides = {}
    for field, value in overrides.items():
        value = plain(value)
        try:
            current = config_path.get_value(field, config)
        except (KeyError, AttributeError, IndexError, TypeError):
            close = difflib.get_close_matches(field, _field_names(base), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SweepError(
                f"{label}: unknown config field {field!r}{hint}. A run's overrides must name fields of the "
                "--config file (listed in it and in the README)."
            ) from None
        if isinstance(current, ml_collections.ConfigDict):
            raise SweepError(f"{label}: config.{field} is a group of fields; set its fields ({field}.NAME).")

        def wrong_type(current=current, field=field, value=value) -> SweepError:
            kind = type(current).__name__ if current is not None else "typed"
            return SweepError(
                f"{label}: config.{field}={value!r} has the wrong type: the field holds {kind} values "
                f"(here {current!r}), the run gives a {type(value).__name__}."
            )

        # ml_collections lets a bool into an int or float field (bool is an int) and None into any.
        if current is not None and (value is None or isinstance(value, bool) != isinstance(current, bool)):
            raise wrong_type()
        try:
            config_path.set_value(field, config, value)
        except (TypeError, ValueError, KeyError, AttributeError):
            raise wrong_type() from None
        applied[field] = config_path.get_value(field, config)
    return config, applied


def plan_runs(base: ml_collections.ConfigDict, sweep: Sequence[Mapping[str, Any]], workdir: str) -> list[Run]:
    """Every run of the sweep built, type-checked and validated (``validation.validate``, what each
    stage runs first), named and placed in ``workdir/<name>``; raises on the first mistake."""
    from simclrv2_jax.config.validation import validate

    if not sweep:
        raise SweepError("the sweep has no runs: get_sweep() returned an empty list.")
    runs: list[Run] = []
    by_config: dict[str, Run] = {}
    by_name: dict[str, Run] = {}
    for index, overrides in enumerate(sweep):
        label = f"sweep run {index} ({run_name({k: plain(v) for k, v in overrides.items()})})"
        config, applied = apply_overrides(base, overrides, label)
        name = run_name(applied)
        label = f"sweep run {index} ({name})"
        try:
            validate(config)
        except (ValueError, TypeError) as e:
            raise SweepError(f"{label}: {e}") from None
        key = json.dumps(config.to_dict(), sort_keys=True, default=repr)
        if key in by_config:
            other = by_config[key]
            fields = sorted(set(other.overrides) | set(applied)) or ["none"]
            raise SweepError(
                f"sweep runs {other.index} ({other.name}) and {index} ({name}) have the same config (fields "
                f"they set: {', '.join(fields)}), so they would give the same results: drop one of them."
            )
        if name in by_name:
            other = by_name[name]
            raise SweepError(
                f"sweep runs {other.index} and {index} would share the folder {name!r}: make their "
                "overrides differ in more than their characters outside A-Z a-z 0-9 . _ + -."
            )
        run = Run(
            index=index, name=name, overrides=applied, config=config, workdir=os.path.join(workdir, name)
        )
        runs.append(run)
        by_config[key] = by_name[name] = run
    return runs


def swept_fields(runs: Sequence[Run]) -> list[str]:
    """The fields any run sets, in the order they first appear."""
    fields: dict[str, None] = {}
    for run in runs:
        fields.update(dict.fromkeys(run.overrides))
    return list(fields)
