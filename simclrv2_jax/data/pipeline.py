"""tf.data input pipelines: one process's share of the global batch, and global JAX arrays.

Training streams are infinite sequences of epochs over this process's shard of the split. Every
random choice is a pure function of ``(seed, epoch, position in the epoch, process_index)``:

* epoch ``e`` visits the shard in an order drawn from ``(seed, e, process_index)``;
* the element at position ``p`` of epoch ``e`` is augmented with a seed derived from
  ``(seed, e, p, process_index)``, split once more per view.

The stream is batched with the remainder of the *stream* dropped, so batches may straddle epochs,
and the batch of step ``s`` is the stream's elements ``[s*b, (s+1)*b)``. Resuming at ``start_step``
jumps straight to epoch ``(s*b) // n`` and skips ``(s*b) % n`` elements of it, nothing is replayed,
and because of the above the batches are bit-identical to those of an uninterrupted run.

In-memory sources permute with ``tf.random.experimental.index_shuffle``, a stateless bijection of
``[0, n)``, so jumping is O(1). Streaming (tfds) sources order an epoch in two stages, as the
authors' input does (``shuffle_files=True``, then ``Dataset.shuffle``):

1. the shard's files (tfds file instructions: a file, or the part of one the shard holds) are
   read in a permutation drawn from ``file_order_seed(seed, e, process_index)`` (``index_shuffle``
   again, see ``epoch_file_order``), 16 files interleaved deterministically, so the examples that
   meet in a batch change from epoch to epoch and not only within the shuffle buffer's reach;
2. a shuffle buffer, whose seed is drawn from ``order_seed(seed, e, process_index)``, mixes them.

Both stages are deterministic functions of the seeds, so the epoch's order, and therefore resume,
is exact there too (the skipped elements of the first epoch are read but stay encoded, never
decoded or augmented). Sharding is unchanged: each process reads the contiguous range
``shard_bounds`` gives it and only reorders its own files, so the processes still cover every
example exactly once per epoch. Evaluation and ``DataSource.labels`` read in canonical order, and
every example keeps its canonical ``index`` (label subsets filter on it) whatever the file order.
"""

import re
from collections.abc import Callable

import numpy as np

from simclrv2_jax.data import augment, sources
from simclrv2_jax.data.array_pipeline import ORDER_STREAM, epoch_order, num_eval_batches
from simclrv2_jax.data.tf_cpu import tf

# Separate streams so that the order of examples and their augmentation are independent.
_AUGMENT_STREAM = 0xA06E
_FILE_ORDER_STREAM = 0xF11E

Preprocess = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def _fold(seed: tf.Tensor, *data) -> tf.Tensor:
    for d in data:
        seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(d, tf.int64))
    return seed


def order_seed(seed: int, epoch, process_index: int) -> tf.Tensor:
    """The ``[2]`` int64 seed of the visiting order of one epoch on one process."""
    return _fold(tf.constant([seed, ORDER_STREAM], tf.int64), epoch, process_index)


def file_order_seed(seed: int, epoch, process_index: int) -> tf.Tensor:
    """The ``[2]`` int64 seed of the order in which one epoch on one process reads its files."""
    return _fold(tf.constant([seed, _FILE_ORDER_STREAM], tf.int64), epoch, process_index)


def augmentation_seed(seed: int, epoch, position, process_index: int) -> tf.Tensor:
    """The ``[2]`` int64 seed that augments the element at ``position`` of ``epoch``."""
    return _fold(tf.constant([seed, _AUGMENT_STREAM], tf.int64), epoch, position, process_index)


def _permutation(n: int, seed: tf.Tensor) -> tf.Tensor:
    return tf.random.experimental.index_shuffle(
        tf.range(n, dtype=tf.int64), seed, tf.constant(n - 1, tf.int64)
    )


def epoch_permutation(seed: int, epoch: int, n: int, process_index: int = 0) -> np.ndarray:
    """Order in which an in-memory shard of ``n`` examples is visited in ``epoch`` (for tests and
    inspection; the pipeline computes the same thing element by element)."""
    return _permutation(n, order_seed(seed, epoch, process_index)).numpy()


def epoch_file_order(seed: int, epoch: int, num_files: int, process_index: int = 0) -> np.ndarray:
    """Order in which a streamed shard's ``num_files`` files (``source.num_files``, canonical
    order) are read in ``epoch``, before the shuffle buffer (for tests and inspection)."""
    return _permutation(num_files, file_order_seed(seed, epoch, process_index)).numpy()


def _check_process(process_index: int, process_count: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"Need 0 <= process_index < process_count, got {process_index} and {process_count}.")


def _positions(source: sources.DataSource, split: str, indices) -> np.ndarray | None:
    if indices is None:
        return None
    n = source.num_examples(split)
    positions = np.unique(np.asarray(indices, np.int64))
    if len(positions) and (positions[0] < 0 or positions[-1] >= n):
        raise ValueError(f"indices must lie in [0, {n}) for split {split!r} of {source.name!r}.")
    return positions


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    return options


def _in_memory_examples(source, split, positions, start, seed, process_index, process_count):
    images, labels = source.arrays(split)
    if positions is None:
        positions = np.arange(len(labels), dtype=np.int64)
    # Strided over the (possibly subset) positions, so shard sizes differ by at most one.
    local = positions[process_index::process_count]
    n_local = len(local)
    if n_local == 0:
        raise ValueError(
            f"Process {process_index} of {process_count} gets no examples of "
            f"{source.name!r}/{split} ({len(positions)} selected)."
        )
    images_t = tf.constant(images[local])
    labels_t = tf.constant(labels[local])
    n_t = tf.constant(n_local, tf.int64)

    def element(t):
        epoch, position = t // n_t, t % n_t
        j = tf.random.experimental.index_shuffle(position, order_seed(seed, epoch, process_index), n_t - 1)
        return {
            "image": tf.gather(images_t, j),
            "label": tf.gather(labels_t, j),
            "epoch": epoch,
            "position": position,
        }

    return tf.data.Dataset.counter(start).map(
        element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )


def _file_examples(source, split, positions, start, seed, process_index, process_count):
    """An image folder's training stream in the order of the input without TensorFlow
    (``array_pipeline.train_indices``: NumPy epoch orders), so both give a step the same images; each
    element is the image's index in the split (decoded by ``_file_decoder``)."""
    n = source.num_examples(split)
    local = (positions if positions is not None else np.arange(n, dtype=np.int64))[
        process_index::process_count
    ]
    n_local = len(local)
    if n_local == 0:
        raise ValueError(
            f"Process {process_index} of {process_count} gets no examples of {source.root}/{split}."
        )
    labels = source.labels(split)

    def elements():
        t = start
        epoch, order = None, None
        while True:
            e, position = divmod(t, n_local)
            if e != epoch:
                epoch, order = e, local[epoch_order(seed, e, n_local, process_index)]
            index = int(order[position])
            yield index, int(labels[index]), e, position
            t += 1

    spec = tuple(tf.TensorSpec([], tf.int64) for _ in range(4))
    ds = tf.data.Dataset.from_generator(elements, output_signature=spec)
    return ds.map(lambda i, label, e, p: {"image": i, "label": label, "epoch": e, "position": p})


def with_file_errors(ds):
    """The batches of a tf.data input from image files; a file that did not decode (its error raised
    in tf.data's threads) surfaces as the ``BadImageError`` naming it."""
    from simclrv2_jax.data.folders import BadImageError

    try:
        yield from ds.as_numpy_iterator()
    except tf.errors.OpError as e:
        found = re.search(r"The image .*?where it stopped\.", e.message, re.S)
        if found:
            raise BadImageError(found.group(0)) from None
        raise


def _file_decoder(source, split):
    """``decode(index) -> uint8 [H, W, 3]``: the image decoded in tf.data's threads with the source's
    own decoder (Pillow, as without TensorFlow); a bad file's error names it (``FolderSource.decode``)."""
    paths = source.image_paths(split)

    def decode_numpy(index):
        return source.decode(paths, int(index))

    def decode(index):
        image = tf.numpy_function(decode_numpy, [index], tf.uint8, stateful=False)
        return tf.ensure_shape(image, [None, None, 3])

    return decode


def _streaming_examples(
    source,
    split,
    positions,
    start,
    seed,
    process_index,
    process_count,
    local_batch_size,
    shuffle_buffer,
    image_size,
):
    shard_indices = source.shard_bounds(split, process_index, process_count)
    n_local = len(shard_indices)
    keep_t = None
    if positions is not None:
        keep = np.zeros(source.num_examples(split), bool)
        keep[positions] = True
        n_local = int(keep[shard_indices].sum())
        keep_t = tf.constant(keep)
    if n_local == 0:
        raise ValueError(
            f"Process {process_index} of {process_count} gets no examples of {source.name!r}/{split}."
        )
    # Duck-typed sources without `num_files` (benchmarks/input_pipeline.py's JpegSource) are one file.
    num_files = getattr(source, "num_files", lambda *_: 1)(split, process_index, process_count)
    shard = None
    if num_files == 1:
        shard = source.load(split, shard_index=process_index, num_shards=process_count, decode=False)
    if shuffle_buffer is None:
        # As the official input (50 local batches for images of 32 px or less, else 10), at least
        # 10k examples, never more than the shard.
        batches = 50 if image_size <= 32 else 10
        shuffle_buffer = max(10_000, batches * local_batch_size)
    shuffle_buffer = min(shuffle_buffer, n_local)
    first_epoch, first_skip = divmod(start, n_local)

    def epoch_examples(epoch):
        ds = shard
        if ds is None:
            file_order = _permutation(num_files, file_order_seed(seed, epoch, process_index))
            ds = source.load_files(
                split, file_order, shard_index=process_index, num_shards=process_count, decode=False
            )
        if keep_t is not None:
            ds = ds.filter(lambda ex: tf.gather(keep_t, ex["index"]))
        shuffle_seed = tf.random.stateless_uniform(
            [], seed=order_seed(seed, epoch, process_index), minval=0, maxval=2**62, dtype=tf.int64
        )
        ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        skip = tf.where(epoch == first_epoch, tf.constant(first_skip, tf.int64), tf.constant(0, tf.int64))
        ds = ds.enumerate().skip(skip)
        return ds.map(
            lambda position, ex: {
                "image": ex["image"],
                "label": ex["label"],
                "epoch": epoch,
                "position": position,
            }
        )

    return tf.data.Dataset.counter(first_epoch).flat_map(epoch_examples)


def train_dataset(
    source: sources.DataSource,
    split: str,
    *,
    local_batch_size: int,
    seed: int,
    start_step: int = 0,
    num_views: int,
    image_size: int,
    preprocess: Preprocess,
    process_index: int = 0,
    process_count: int = 1,
    indices=None,
    shuffle_buffer: int | None = None,
) -> tf.data.Dataset:
    """Infinite training batches of this process: ``image`` float32 ``[b, H, W, C]`` (or
    ``[b, num_views, H, W, C]`` when ``num_views > 1``), ``label`` int32 ``[b]``, ``mask`` float32
    ``[b]`` (all ones).

    ``preprocess(image, seed)`` maps a float32 ``[h, w, C]`` image in [0, 1] and a ``[2]`` seed to
    a ``[image_size, image_size, C]`` view. ``indices`` restricts the split to those examples (label
    fractions). ``start_step`` resumes exactly; see the module docstring. ``shuffle_buffer`` only
    matters for streaming sources.
    """
    _check_process(process_index, process_count)
    if local_batch_size < 1 or num_views < 1 or start_step < 0:
        raise ValueError(
            f"Need local_batch_size >= 1, num_views >= 1, start_step >= 0; got "
            f"{local_batch_size}, {num_views}, {start_step}."
        )
    positions = _positions(source, split, indices)
    start = start_step * local_batch_size
    decode = source.decode_image
    if getattr(source, "files", False):
        examples = _file_examples(source, split, positions, start, seed, process_index, process_count)
        decode = _file_decoder(source, split)
    elif source.in_memory:
        examples = _in_memory_examples(source, split, positions, start, seed, process_index, process_count)
    else:
        examples = _streaming_examples(
            source,
            split,
            positions,
            start,
            seed,
            process_index,
            process_count,
            local_batch_size,
            shuffle_buffer,
            image_size,
        )
    channels = source.image_shape[-1]

    def make_views(ex):
        image = tf.cast(decode(ex["image"]), tf.float32) / 255.0
        view_seeds = tf.random.experimental.stateless_split(
            augmentation_seed(seed, ex["epoch"], ex["position"], process_index), num=num_views
        )
        views = [
            tf.ensure_shape(preprocess(image, view_seeds[v]), [image_size, image_size, channels])
            for v in range(num_views)
        ]
        return {
            "image": views[0] if num_views == 1 else tf.stack(views),
            "label": tf.cast(ex["label"], tf.int32),
            "mask": tf.constant(1.0, tf.float32),
        }

    ds = examples.map(make_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch_size, drop_remainder=True)
    ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options())
    return with_file_errors(ds) if getattr(source, "files", False) else ds


def eval_dataset(
    source: sources.DataSource,
    split: str,
    *,
    local_batch_size: int,
    image_size: int,
    process_index: int = 0,
    process_count: int = 1,
    crop: bool = True,
    indices: np.ndarray | None = None,
) -> tf.data.Dataset:
    """One pass over this process's shard with eval preprocessing, padded to
    ``num_eval_batches`` full batches. Keys: ``image``, ``label`` int32, ``mask`` float32 (0 on
    padding, so metrics summed with the mask are exact over the whole split) and ``index`` int32
    (the example's position in the split, -1 on padding). ``indices``: only those positions."""
    _check_process(process_index, process_count)
    n = source.num_examples(split)
    keep = None
    if indices is None:
        batches = num_eval_batches(n, local_batch_size=local_batch_size, process_count=process_count)
    else:
        indices = np.asarray(indices, np.int64)
        keep = np.zeros(n, bool)
        keep[indices] = True
        if getattr(source, "files", False):
            largest = max(len(indices[p::process_count]) for p in range(process_count))
        else:  # contiguous shards: count the kept examples in each
            largest = max(
                int(keep[source.shard_bounds(split, p, process_count)].sum()) for p in range(process_count)
            )
        batches = -(-largest // local_batch_size)
    channels = source.image_shape[-1]

    def prepare(ex):
        image = tf.cast(ex["image"], tf.float32) / 255.0
        image = augment.preprocess_for_eval(image, height=image_size, width=image_size, crop=crop)
        return {
            "image": image,
            "label": tf.cast(ex["label"], tf.int32),
            "mask": tf.constant(1.0, tf.float32),
            "index": tf.cast(ex["index"], tf.int32),
        }

    padding = tf.data.Dataset.from_tensors(
        {
            "image": tf.zeros([image_size, image_size, channels], tf.float32),
            "label": tf.constant(0, tf.int32),
            "mask": tf.constant(0.0, tf.float32),
            "index": tf.constant(-1, tf.int32),
        }
    ).repeat()
    if getattr(source, "files", False):
        # Strided shards of the files in index order, decoded as the training input decodes them.
        universe = np.arange(n, dtype=np.int64) if indices is None else indices
        mine = universe[process_index::process_count]
        labels = source.labels(split)[mine]
        ds = tf.data.Dataset.from_tensor_slices({"image": mine, "label": labels, "index": mine})
        decode = _file_decoder(source, split)
        ds = ds.map(lambda ex: {**ex, "image": decode(ex["image"])}, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = source.load(split, shard_index=process_index, num_shards=process_count)
        if keep is not None:
            kept = tf.constant(keep)
            ds = ds.filter(lambda ex: tf.gather(kept, tf.cast(ex["index"], tf.int64)))
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.concatenate(padding).take(batches * local_batch_size)
    ds = ds.batch(local_batch_size, drop_remainder=True)
    ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options())
    return with_file_errors(ds) if getattr(source, "files", False) else ds
