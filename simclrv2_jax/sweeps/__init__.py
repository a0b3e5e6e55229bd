"""Hyperparameter sweeps: one stage config, many runs, each with its own overrides and workdir.

    python -m simclrv2_jax.sweep --config=configs/finetune.py:fashion_mnist \\
        --sweep=configs/sweeps/finetune_lr_selector.py --workdir=runs/sweeps/ft_lr_selector \\
        --config.checkpoint=runs/fashion_mnist_1pct/pretrain      # base overrides: every run
    ... --launch=print        # one `python -m simclrv2_jax.main ...` command line per run, nothing run
    ... --launch=tpu          # one `launch/tpu.sh run ...` per run, one after another (TPU_NAME, ZONE)
    ... --dry_run             # check every run and print the plan; nothing is created or run
    ... --collect_only        # only gather the runs' results into sweep.csv / sweep.png
    ... --metric=eval.loss    # what the table and the plot show (default eval.top1)

A sweep file is Python with ``get_sweep()`` returning a list of override dicts, one per run (field
name -> value; dotted names for nested fields), built with the helpers here or written out::

    from simclrv2_jax import sweeps

    def get_sweep():
        return sweeps.product(learning_rate=[0.025, 0.05, 0.1], ft_proj_selector=[0, 1, 2])

``product`` crosses its factors (the first varies slowest), ``zip`` pairs them element by element,
``chain`` concatenates sweeps. A factor is ``field=[values]`` (or ``{"dotted.field": [values]}``) or
a sweep itself, so they nest: ``sweeps.chain(sweeps.product(a=[1, 2], b=[3]), [{"a": 5}])``.

Every run's config is the ``--config`` file with the command line's overrides, then the run's own;
all of them are built, type-checked (as ``--config.FIELD=VALUE`` is) and validated before the first
run starts, and any mistake is one ``error:`` line naming the run and the field. Run ``i`` trains in
``WORKDIR/<name>``, its name its overrides (``learning_rate=0.1,ft_proj_selector=1``). Running the
same command again skips finished runs and resumes an interrupted one from its checkpoint.
``WORKDIR/sweep.json`` lists the runs; ``sweep.csv`` and ``sweep.png`` hold their results.
"""

from __future__ import annotations

import builtins
import itertools
from collections.abc import Iterable, Mapping
from typing import Any

Overrides = dict[str, Any]


class SweepError(ValueError):
    """A sweep that cannot run as written: one message naming the run (index and name) and the field."""


def plain(value: Any) -> Any:
    """A NumPy scalar (``np.logspace(...)`` values) as the Python number a config field takes."""
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def _field_values(where: str, field: str, values: Any) -> list[Overrides]:
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise SweepError(
            f"sweeps.{where}: {field}={values!r} is not a list of values; write {field}=[{values!r}] for one."
        )
    values = list(values)
    if not values:
        raise SweepError(f"sweeps.{where}: {field} has no values.")
    return [{field: plain(v)} for v in values]


def _sweep(where: str, runs: Any) -> list[Overrides]:
    """A sweep (a sequence of override dicts) as a list of fresh dicts."""
    if isinstance(runs, (str, bytes, Mapping)) or not isinstance(runs, Iterable):
        raise SweepError(f"sweeps.{where}: {runs!r} is not a sweep (a list of override dicts).")
    runs = list(runs)
    for i, run in enumerate(runs):
        if not isinstance(run, Mapping):
            raise SweepError(f"sweeps.{where}: element {i} of a sweep is {run!r}, not an override dict.")
    return [dict(run) for run in runs]


def _factors(where: str, args: tuple[Any, ...], fields: Mapping[str, Any]) -> list[list[Overrides]]:
    """The factors of ``product`` / ``zip``: each field's values as a one-field sweep, or a sweep."""
    factors = []
    for arg in args:
        if isinstance(arg, Mapping):
            factors += [_field_values(where, k, v) for k, v in arg.items()]
        else:
            factors.append(_sweep(where, arg))
    factors += [_field_values(where, k, v) for k, v in fields.items()]
    if not factors:
        raise SweepError(f"sweeps.{where}() needs at least one field or sweep.")
    return factors


def _merge(where: str, parts: Iterable[Overrides]) -> Overrides:
    merged: Overrides = {}
    for part in parts:
        for field, value in part.items():
            if field in merged:
                raise SweepError(f"sweeps.{where}: the field {field} is set by two of its factors.")
            merged[field] = value
    return merged


def product(*sweeps: Any, **fields: Any) -> list[Overrides]:
    """Every combination of the factors, the first varying slowest (``itertools.product``'s order).

    ``product(a=[1, 2], b=[3, 4, 5])`` is six runs: ``{a: 1, b: 3}, {a: 1, b: 4}, ..., {a: 2, b: 5}``.
    Positional factors are sweeps (lists of override dicts) or ``{field: [values]}`` mappings, for
    dotted names; they come before the keyword fields.
    """
    factors = _factors("product", sweeps, fields)
    return [_merge("product", combo) for combo in itertools.product(*factors)]


def zip(*sweeps: Any, **fields: Any) -> list[Overrides]:
    """The factors paired element by element; they must have the same length.

    ``zip(learning_rate=[0.1, 0.2], warmup_epochs=[0, 5])`` is two runs: ``{0.1, 0}`` and ``{0.2, 5}``.
    """
    factors = _factors("zip", sweeps, fields)
    lengths = [len(f) for f in factors]
    if len(set(lengths)) > 1:
        described = ", ".join(f"{'/'.join(f[0]) if f else 'a sweep'} has {len(f)}" for f in factors)
        raise SweepError(f"sweeps.zip: the factors differ in length ({described}); give each the same count.")
    return [_merge("zip", parts) for parts in builtins.zip(*factors)]


def chain(*sweeps: Any) -> list[Overrides]:
    """The sweeps one after another: ``chain(product(a=[1, 2]), [{"b": 3}])`` is three runs."""
    runs: list[Overrides] = []
    for s in sweeps:
        if isinstance(s, Mapping):
            raise SweepError(
                "sweeps.chain takes sweeps (lists of override dicts); write one run as a list: "
                f"[{dict(s)!r}]."
            )
        runs += _sweep("chain", s)
    return runs


__all__ = ["SweepError", "chain", "plain", "product", "zip"]
