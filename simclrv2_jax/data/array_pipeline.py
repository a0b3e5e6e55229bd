"""Input without TensorFlow: this process's batches of in-memory images, for augmentation on the device.

The counterpart of ``pipeline.py`` (tf.data) when the SimCLR augmentations run inside the jitted step
(``augment_on_device``): the host only indexes the arrays, so it needs NumPy alone. The stream
contract is the same as the tf.data one:

* the training stream is an infinite sequence of epochs over this process's shard (strided over the
  selected examples, so shard sizes differ by at most one); epoch ``e`` visits it in the order of a
  NumPy permutation seeded by ``(seed, e, process_index)``;
* it is batched with the remainder of the *stream* dropped, so the batch of step ``s`` is the stream's
  elements ``[s*b, (s+1)*b)``; resuming at ``start_step`` jumps straight there, and the batches are
  bit-identical to those of an uninterrupted run.

Images stay uint8 ``[b, H, W, C]`` at their stored size; the step crops, resizes and augments them.
Evaluation batches are padded to ``num_eval_batches`` full batches with ``mask`` 0 on the padding.
Also here: turning each process's local batches into global arrays on the mesh, for both pipelines.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Iterable, Iterator

import jax
import numpy as np

# The random stream of the example order, apart from the augmentations' (the tf.data pipeline too).
ORDER_STREAM = 0x0DE5


def epoch_order(seed: int, epoch: int, n: int, process_index: int = 0) -> np.ndarray:
    """The order in which a shard of ``n`` examples is visited in ``epoch`` (a permutation of n)."""
    return np.random.default_rng([seed, ORDER_STREAM, epoch, process_index]).permutation(n)


def _check_process(process_index: int, process_count: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"Need 0 <= process_index < process_count, got {process_index} and {process_count}.")


def _selected(num_examples: int, indices) -> np.ndarray:
    if indices is None:
        return np.arange(num_examples, dtype=np.int64)
    positions = np.unique(np.asarray(indices, np.int64))
    if len(positions) and (positions[0] < 0 or positions[-1] >= num_examples):
        raise ValueError(f"indices must lie in [0, {num_examples}).")
    return positions


def train_indices(
    num_examples: int,
    *,
    local_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    indices=None,
    what: str = "the split",
) -> Iterator[np.ndarray]:
    """The example indices of this process's training batches, step after step from ``start_step``
    (see the module docstring: strided shard, an epoch order from ``(seed, epoch, process_index)``,
    the stream's remainder dropped). ``indices`` restricts the split (label fractions)."""
    _check_process(process_index, process_count)
    if local_batch_size < 1 or start_step < 0:
        raise ValueError(
            f"Need local_batch_size >= 1 and start_step >= 0; got {local_batch_size}, {start_step}."
        )
    local = _selected(num_examples, indices)[process_index::process_count]
    n = len(local)
    if n == 0:
        raise ValueError(f"Process {process_index} of {process_count} gets no examples of {what}.")
    epoch, position = divmod(start_step * local_batch_size, n)
    order = local[epoch_order(seed, epoch, n, process_index)]
    while True:
        parts, needed = [], local_batch_size
        while needed:
            take = order[position : position + needed]
            parts.append(take)
            needed -= len(take)
            position += len(take)
            if position == n:
                epoch, position = epoch + 1, 0
                order = local[epoch_order(seed, epoch, n, process_index)]
        yield np.concatenate(parts)


def train_batches(
    source,
    split: str,
    *,
    local_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    indices=None,
) -> Iterator[dict[str, np.ndarray]]:
    """Infinite training batches of this process: ``image`` uint8 ``[b, H, W, C]``, ``label`` int32
    ``[b]``, ``mask`` float32 ``[b]`` (ones). ``indices`` restricts the split (label fractions)."""
    images, labels = source.arrays(split)
    mask = np.ones(local_batch_size, np.float32)
    for chosen in train_indices(
        len(labels),
        local_batch_size=local_batch_size,
        seed=seed,
        start_step=start_step,
        process_index=process_index,
        process_count=process_count,
        indices=indices,
        what=f"{source.name!r}/{split}",
    ):
        yield {"image": images[chosen], "label": labels[chosen].astype(np.int32), "mask": mask}


def eval_positions(
    num_examples: int,
    *,
    local_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    indices: np.ndarray | None = None,
):
    """``(chosen, pad)`` of each evaluation batch: this process's strided shard of the split (or of
    its positions ``indices``), padded to ``num_eval_batches`` full batches."""
    _check_process(process_index, process_count)
    universe = np.arange(num_examples) if indices is None else np.asarray(indices, np.int64)
    shard = universe[process_index::process_count]
    batches = num_eval_batches(len(universe), local_batch_size=local_batch_size, process_count=process_count)
    for i in range(batches):
        chosen = shard[i * local_batch_size : (i + 1) * local_batch_size]
        yield chosen, local_batch_size - len(chosen)


def num_eval_batches(num_examples: int, *, local_batch_size: int, process_count: int = 1) -> int:
    """Batches every process yields in one eval pass (the largest shard, rounded up)."""
    return math.ceil(math.ceil(num_examples / process_count) / local_batch_size)


def eval_batches(
    source,
    split: str,
    *,
    local_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    indices: np.ndarray | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over this process's strided shard (of ``indices`` only, if given), as stored (uint8),
    padded to ``num_eval_batches`` full batches. Keys: ``image``, ``label`` int32, ``mask`` float32 (0
    on padding), ``index`` int32 (position in the split, -1 on padding)."""
    images, labels = source.arrays(split)
    for chosen, pad in eval_positions(
        len(labels),
        local_batch_size=local_batch_size,
        process_index=process_index,
        process_count=process_count,
        indices=indices,
    ):
        yield padded_batch(images[chosen], labels[chosen], chosen, pad)


def padded_batch(
    images: np.ndarray, labels: np.ndarray, chosen: np.ndarray, pad: int
) -> dict[str, np.ndarray]:
    """An evaluation batch of ``images`` and ``labels`` with ``pad`` zero rows (mask 0, index -1)."""
    if pad:
        images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    return {
        "image": images,
        "label": np.pad(np.asarray(labels).astype(np.int32), (0, pad)),
        "mask": np.pad(np.ones(len(chosen), np.float32), (0, pad)),
        "index": np.pad(np.asarray(chosen).astype(np.int32), (0, pad), constant_values=-1),
    }


def numpy_batches(ds: Iterable) -> Iterator[dict[str, np.ndarray]]:
    """Host batches as NumPy from either input: a tf.data dataset or an iterable of NumPy batches."""
    return ds.as_numpy_iterator() if hasattr(ds, "as_numpy_iterator") else iter(ds)


def concatenated(streams: list[Iterable]) -> Iterator[dict[str, np.ndarray]]:
    """One batch from each stream, joined along the batch axis in stream order (a process reading
    several input shards: its local batch is theirs one after the other)."""
    for parts in zip(*(numpy_batches(s) for s in streams)):
        yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def make_global_batch(
    local_batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding
) -> dict[str, jax.Array]:
    """Global arrays, sharded on the leading (batch) axis, from every process's local batch."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


def global_iterator(
    ds, sharding: jax.sharding.Sharding, *, prefetch: int = 2
) -> Iterator[dict[str, jax.Array]]:
    """Global batches from a tf.data dataset or any iterable of local batches.

    Keeps ``prefetch`` batches already transferred, so host-to-device copies overlap the step.
    """
    iterator = numpy_batches(ds)
    queue = collections.deque()

    def enqueue(n):
        for batch in itertools.islice(iterator, n):
            queue.append(make_global_batch(batch, sharding))

    enqueue(max(1, prefetch))
    while queue:
        yield queue.popleft()
        enqueue(1)
