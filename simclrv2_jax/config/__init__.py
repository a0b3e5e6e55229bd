"""Configs: the fields, each stage's defaults and presets, and the checks every config passes.

``get_config("pretrain", "imagenet,r50_2x_sk1")`` is what ``--config=configs/pretrain.py:imagenet,
r50_2x_sk1`` gives; the stage modules (``pretrain``, ``finetune``, ``distill``) hold the presets and
the files under the repository's ``configs/`` call them, so the installed package has every default
it needs without the repository. ``from_saved`` is the one rule by which a run saved by another
version of the package is read: the stage's current defaults, with every field the run saved on top.

Importing this package imports ``ml_collections`` and nothing heavier (no JAX): ``validation`` is
imported where it is used.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import json
import os
from collections.abc import Iterator
from typing import Any

import ml_collections

from simclrv2_jax.config.fields import STAGES

STAGE_CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def stage_module(stage: str):
    """The module holding a stage's ``get_config(presets)``."""
    if stage not in STAGES:
        raise ValueError(f"Unknown stage {stage!r}; use one of {STAGES}.")
    return importlib.import_module(f"simclrv2_jax.config.{stage}")


def stage_config_file(stage: str) -> str:
    """Path of the package's config file of a stage (a ``--config=`` file, as configs/<stage>.py is)."""
    stage_module(stage)
    return os.path.join(STAGE_CONFIG_DIR, f"{stage}.py")


def get_config(stage: str, presets: str | None = None) -> ml_collections.ConfigDict:
    """A stage's config with ``presets`` applied (``"dataset[,model][,extra]"``; None = defaults)."""
    return stage_module(stage).get_config(presets)


def plain(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """The config as it is saved (JSON): tuples become lists, keys strings."""
    as_dict = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    return json.loads(json.dumps(as_dict))


def from_saved(saved: dict[str, Any]) -> ml_collections.ConfigDict:
    """A config saved by a run (``config.json``, or the one beside a checkpoint) as a full config.

    The fields are the saved stage's current defaults (``get_config(stage)``); each saved value
    replaces its default, so a field added since the run was saved keeps its default, and a field
    since dropped is left out. A ``ValueError`` when the saved config names no known stage.
    """
    stage = saved.get("stage") if isinstance(saved, dict) else None
    if stage not in STAGES:
        raise ValueError(f"The saved config names no known stage ({stage!r}; expected one of {STAGES}).")
    config = get_config(stage)
    for key, value in saved.items():
        if key in config:
            default = config[key]
            try:
                config[key] = tuple(value) if isinstance(default, tuple) and value is not None else value
            except TypeError as e:
                raise ValueError(
                    f"The saved config's {key}={value!r} does not fit the field ({e})."
                ) from None
    return config


# The command-line flag that holds the config of the stage being run: ``config`` for ``main``, the
# stage's own (``finetune``, ``distill``, ...) under ``run_all``. Advice in error messages names it.
_FLAG = contextvars.ContextVar("simclrv2_jax_config_flag", default="config")


def flag(field: str) -> str:
    """The command-line spelling of ``field`` for the command being run, e.g. ``--config.seed``."""
    return f"--{_FLAG.get()}.{field}"


@contextlib.contextmanager
def command_flag(name: str) -> Iterator[None]:
    """Within it, ``flag(field)`` spells fields as ``--<name>.<field>`` (``run_all``'s stage flags)."""
    token = _FLAG.set(name)
    try:
        yield
    finally:
        _FLAG.reset(token)
