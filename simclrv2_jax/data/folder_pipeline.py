"""Input from image folders without TensorFlow: files decoded with Pillow in threads, by step.

The order is ``array_pipeline``'s (``train_indices``: the strided shard, an epoch order drawn from
``(seed, epoch, process_index)``), so the batch of a step is the same with and without TensorFlow and
a resumed run reads exactly what the uninterrupted one read. Each image is decoded
(``FolderSource.decode``: EXIF orientation, RGB) and resized to a fixed square (``size``) so that a
batch is one array; the step crops and augments it (``augment_on_device``). Pillow releases the GIL
while it decodes and resizes, so a pool of threads, one per core, decodes in parallel; the next
batches are decoded while the step runs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
from collections.abc import Iterator

import numpy as np

from simclrv2_jax.data.array_pipeline import eval_positions, padded_batch, train_indices
from simclrv2_jax.data.folders import FolderSource, resize_image

PREFETCH_BATCHES = 2


def decode_threads() -> int:
    """Decoding threads: one per core this process may use (``SIMCLR_DECODE_THREADS`` overrides)."""
    value = os.environ.get("SIMCLR_DECODE_THREADS", "")
    if value.strip():
        return max(1, int(value))
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def train_batches(
    source: FolderSource,
    split: str,
    *,
    local_batch_size: int,
    seed: int,
    size: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    indices=None,
) -> Iterator[dict[str, np.ndarray]]:
    """Infinite training batches of this process: ``image`` uint8 ``[b, size, size, 3]``, ``label``
    int32 ``[b]`` (-1 for unlabeled images), ``mask`` float32 ``[b]`` (ones)."""
    paths = source.image_paths(split)
    labels = source.labels(split)
    mask = np.ones(local_batch_size, np.float32)
    stream = train_indices(
        len(paths),
        local_batch_size=local_batch_size,
        seed=seed,
        start_step=start_step,
        process_index=process_index,
        process_count=process_count,
        indices=indices,
        what=f"{source.root}/{split}",
    )
    make = ((chosen, {"label": labels[chosen].astype(np.int32), "mask": mask}) for chosen in stream)
    for batch in _prefetched(make, source, paths, size):
        batch.pop("chosen")
        yield batch


def eval_batches(
    source: FolderSource,
    split: str,
    *,
    local_batch_size: int,
    size: int,
    process_index: int = 0,
    process_count: int = 1,
    indices: np.ndarray | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over this process's strided shard (of ``indices`` only, if given), images resized to
    ``size x size``, padded to full batches (``mask`` 0 and ``index`` -1 on padding), as
    ``array_pipeline.eval_batches``."""
    paths = source.image_paths(split)
    labels = source.labels(split)
    shard = dict(process_index=process_index, process_count=process_count, indices=indices)

    positions = eval_positions(len(paths), local_batch_size=local_batch_size, **shard)
    for batch in _prefetched(((c, {"pad": p}) for c, p in positions), source, paths, size):
        chosen = batch["chosen"]
        yield padded_batch(batch["image"], labels[chosen], chosen, batch["pad"])


def _prefetched(make_batches, source, paths, size) -> Iterator[dict[str, np.ndarray]]:
    """Batches from ``make_batches`` (``(chosen indices, other fields)``) with their images decoded
    ``PREFETCH_BATCHES`` batches ahead, each image a task of the thread pool; a decoding error surfaces
    when its batch is taken."""
    with concurrent.futures.ThreadPoolExecutor(decode_threads(), thread_name_prefix="decode") as pool:
        pending: collections.deque = collections.deque()
        batches = iter(make_batches)

        def one(position: int) -> np.ndarray:
            return resize_image(source.decode(paths, int(position)), size)

        def submit() -> bool:
            try:
                chosen, fields = next(batches)
            except StopIteration:
                return False
            pending.append(([pool.submit(one, p) for p in chosen], chosen, fields))
            return True

        for _ in range(PREFETCH_BATCHES):
            if not submit():
                break
        while pending:
            futures, chosen, fields = pending.popleft()
            submit()
            images = [f.result() for f in futures]
            empty = np.zeros((0, size, size, 3), np.uint8)
            yield {"image": np.stack(images) if images else empty, "chosen": chosen, **fields}
