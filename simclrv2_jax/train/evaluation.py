"""One pass of a jitted eval step over an eval split: the sums, exact over the split.

The eval step (``step.make_eval_step``) returns per-batch *sums* plus ``count``; the batches are
padded to full size with ``mask`` 0 on the padding, so the summed values divided by the summed count
are exact over the whole split whatever the batch size or device count. The training loop and the
standalone evaluator (``evaluation.evaluator``) both use this.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from simclrv2_jax.data.array_pipeline import global_iterator


class EvalInterrupted(Exception):
    """``should_stop`` asked for a stop between two evaluation batches."""


def eval_totals(
    batches: Iterable,
    state: Any,
    eval_fn: Callable,
    sharding,
    should_stop: Callable[[], bool] | None = None,
    extra: tuple = (),
) -> dict[str, float]:
    """The eval step's sums over ``batches`` (host batches of one pass), ``count`` included.

    Raises ``EvalInterrupted`` between batches when ``should_stop()`` is true.
    """
    totals: dict[str, jax.Array] | None = None
    for batch in global_iterator(batches, sharding):
        if should_stop is not None and should_stop():
            raise EvalInterrupted
        sums = eval_fn(state, batch, *extra)
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    return {} if totals is None else {k: float(v) for k, v in jax.device_get(totals).items()}


def mean_metrics(totals: dict[str, float]) -> dict[str, float]:
    """The sums divided by the example count (``count`` removed); empty when nothing was evaluated."""
    totals = dict(totals)
    if not totals:
        return {}
    count = max(totals.pop("count"), 1.0)
    return {k: v / count for k, v in totals.items()}
