"""Input pipeline: epochs, shards, exact resume, eval padding, global arrays."""

import functools
import gzip
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from simclrv2_jax.data import array_pipeline, augment, pipeline, sources

N = 40  # fake Fashion-MNIST training images, 8x8
SIZE = 8


def _write_idx(path, array):
    array = np.asarray(array, np.uint8)
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes() + array.tobytes())


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fmnist")
    # Image i is the constant 6 * i, so any view that keeps pixel values tells which image it is.
    for prefix, n in (("train", N), ("t10k", 13)):
        _write_idx(
            os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"),
            np.arange(n, dtype=np.uint8)[:, None, None] * 6 * np.ones((1, SIZE, SIZE), np.uint8),
        )
        _write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), np.arange(n) % 10)
    return sources.get_source("fashion_mnist", data_dir=str(directory))


def identity(image, seed):
    del seed
    return image


def image_ids(images):
    return np.rint(images[..., 0, 0, 0] * 255 / 6).astype(int)


def take(ds, n):
    return [b for b, _ in zip(ds.as_numpy_iterator(), range(n))]


def train_ids(source, n_batches, batch=8, **kwargs):
    kwargs = {"seed": 0, "num_views": 1, "image_size": SIZE, "preprocess": identity, **kwargs}
    ds = pipeline.train_dataset(source, "train", local_batch_size=batch, **kwargs)
    return np.concatenate([image_ids(b["image"]) for b in take(ds, n_batches)])


SIMCLR_VIEW = functools.partial(
    augment.preprocess_for_train, height=SIZE, width=SIZE, color_jitter_strength=1.0, use_blur=True
)


def test_epoch_permutation_is_a_permutation():
    orders = [pipeline.epoch_permutation(5, e, N) for e in range(3)]
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.arange(N))
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(orders[0], np.arange(N))


def test_stream_is_successive_epochs_and_batches_span_them(source):
    # 10 batches of 12 = 120 elements = exactly 3 epochs, with batches straddling the boundaries.
    ids = train_ids(source, 10, batch=12, seed=5)
    for e in range(3):
        np.testing.assert_array_equal(ids[e * N : (e + 1) * N], pipeline.epoch_permutation(5, e, N))
    assert train_ids(source, 1, batch=12, seed=6).tolist() != ids[:12].tolist()


def test_batch_contents(source):
    ds = pipeline.train_dataset(
        source, "train", local_batch_size=4, seed=1, num_views=2, image_size=SIZE, preprocess=SIMCLR_VIEW
    )
    batch = take(ds, 1)[0]
    assert batch["image"].shape == (4, 2, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (4,)
    np.testing.assert_array_equal(batch["mask"], np.ones(4, np.float32))
    assert not np.array_equal(batch["image"][:, 0], batch["image"][:, 1])  # views differ
    ids = train_ids(source, 1, batch=4, seed=1)
    np.testing.assert_array_equal(batch["label"], ids % 10)


def test_every_element_view_and_epoch_gets_its_own_augmentation(source):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    def reveal_seed(image, seed):
        return tf.fill(tf.shape(image), tf.random.stateless_uniform([], seed))

    ds = pipeline.train_dataset(
        source, "train", local_batch_size=20, seed=0, num_views=2, image_size=SIZE, preprocess=reveal_seed
    )
    draws = np.concatenate([b["image"][:, :, 0, 0, 0] for b in take(ds, 4)])  # 2 epochs x 2 views
    assert len(np.unique(draws)) == draws.size


def test_resume_is_bit_identical(source):
    # Batch 7 elements of a 40-image epoch: step 5 holds elements 35..41 and crosses into epoch 1.
    kwargs = dict(local_batch_size=7, seed=3, num_views=2, image_size=SIZE, preprocess=SIMCLR_VIEW)
    straight = take(pipeline.train_dataset(source, "train", **kwargs), 6)
    resumed = take(pipeline.train_dataset(source, "train", start_step=3, **kwargs), 3)
    for a, b in zip(straight[3:], resumed):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(a[key], b[key])


def test_process_shards_are_disjoint_and_cover(source):
    # Shards of 14, 13, 13 examples; one epoch of each, batch 1.
    shards = [
        train_ids(source, n, batch=1, process_index=k, process_count=3) for k, n in enumerate((14, 13, 13))
    ]
    everything = np.concatenate(shards)
    np.testing.assert_array_equal(np.sort(everything), np.arange(N))
    for k in range(3):
        assert np.all(shards[k] % 3 == k)


def test_indices_restrict_the_split(source):
    subset = np.array([1, 4, 9, 16, 25, 36])
    shards = [
        train_ids(source, 6, batch=1, indices=subset, process_index=k, process_count=2) for k in range(2)
    ]
    for shard in shards:  # each process sees only its 3 examples, every epoch
        assert len(set(shard.tolist())) == 3
    assert sorted(set(shards[0].tolist()) | set(shards[1].tolist())) == subset.tolist()
    with pytest.raises(ValueError, match="indices"):
        train_ids(source, 1, indices=[N])


def test_eval_dataset_covers_every_example_once(source):
    # 13 test images, 3 processes, batch 2: the largest shard holds 5 -> 3 batches each.
    assert (
        array_pipeline.num_eval_batches(source.num_examples("test"), local_batch_size=2, process_count=3) == 3
    )
    seen = []
    for k in range(3):
        batches = list(
            pipeline.eval_dataset(
                source, "test", local_batch_size=2, image_size=SIZE, process_index=k, process_count=3
            ).as_numpy_iterator()
        )
        assert len(batches) == 3
        for b in batches:
            assert b["image"].shape == (2, SIZE, SIZE, 3)
            real = b["mask"] == 1
            assert np.all(b["index"][~real] == -1) and np.all(b["mask"][~real] == 0)
            np.testing.assert_array_equal(image_ids(b["image"][real]), b["index"][real])
            np.testing.assert_array_equal(b["label"][real], b["index"][real] % 10)
            seen.extend(b["index"][real].tolist())
    assert sorted(seen) == list(range(13))


def test_global_batch_on_eight_devices(source):
    devices = jax.devices()
    assert len(devices) == 8
    sharding = NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec("data"))
    ds = pipeline.train_dataset(
        source, "train", local_batch_size=16, seed=0, num_views=2, image_size=SIZE, preprocess=identity
    )
    local = take(ds, 2)
    batches = [b for b, _ in zip(array_pipeline.global_iterator(ds, sharding), range(2))]
    for g, loc in zip(batches, local):
        assert g["image"].shape == (16, 2, SIZE, SIZE, 3) and g["label"].shape == (16,)
        assert g["image"].sharding == sharding
        assert {s.data.shape for s in g["image"].addressable_shards} == {(2, 2, SIZE, SIZE, 3)}
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(np.asarray(g[key]), loc[key])


# ------------------------------------------------------------------------------------------------
# Streaming (tfds) sources.


class TinyGrayImagesForPipelineTest(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(SIZE, SIZE, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(20), "test": self._generate_examples(7)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"image": np.full((SIZE, SIZE, 1), 6 * i, np.uint8), "label": i % 10}


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tfds"))
    # Several files, so that reading order across files matters.
    TinyGrayImagesForPipelineTest(data_dir=directory).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=3)
    )
    return sources.get_source("tiny_gray_images_for_pipeline_test", directory, in_memory=False)


def test_streaming_epochs_resume_and_shards(streamed):
    assert not streamed.in_memory
    ids = train_ids(streamed, 6, batch=10, seed=2)  # 3 epochs of 20
    epochs = ids.reshape(3, 20)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(20))
    assert not np.array_equal(epochs[0], epochs[1])
    kwargs = dict(local_batch_size=6, seed=2, num_views=2, image_size=SIZE, preprocess=SIMCLR_VIEW)
    straight = take(pipeline.train_dataset(streamed, "train", **kwargs), 5)
    resumed = take(pipeline.train_dataset(streamed, "train", start_step=3, **kwargs), 2)
    for a, b in zip(straight[3:], resumed):  # step 3 crosses from epoch 0 into epoch 1
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    shards = [train_ids(streamed, 10, batch=1, process_index=k, process_count=2) for k in range(2)]
    np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(20))
    # tfds stores examples in its own order: map split positions to the ids drawn in the pixels.
    id_at = {
        int(e["index"]): int(image_ids(e["image"] / 255.0))
        for e in streamed.load("train").as_numpy_iterator()
    }
    subset = train_ids(streamed, 8, batch=1, indices=[0, 3, 5, 11])
    expected = sorted(id_at[i] for i in (0, 3, 5, 11))
    assert sorted(subset[:4].tolist()) == sorted(subset[4:].tolist()) == expected


def test_streaming_eval_covers_every_example_once(streamed):
    seen = []
    for k in range(2):
        for b in pipeline.eval_dataset(
            streamed, "test", local_batch_size=3, image_size=SIZE, process_index=k, process_count=2
        ).as_numpy_iterator():
            real = b["mask"] == 1
            np.testing.assert_array_equal(b["label"][real], image_ids(b["image"][real]) % 10)
            seen.extend(image_ids(b["image"][real]).tolist())
    assert sorted(seen) == list(range(7))


# ------------------------------------------------------------------------------------------------
# Streaming: the files of the training split are read in a new order every epoch.


class EightFilesImagesForPipelineTest(TinyGrayImagesForPipelineTest):
    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(32), "test": self._generate_examples(12)}


FILES, PER_FILE = 8, 4  # 32 training examples in 8 files of 4


@pytest.fixture(scope="module")
def eight_files(tmp_path_factory):
    """The streamed source, and its training split's ids in canonical order as tfds itself reads
    them (files one after the other), so that file f holds ``canonical[4*f : 4*f + 4]``."""
    directory = str(tmp_path_factory.mktemp("tfds8"))
    builder = EightFilesImagesForPipelineTest(data_dir=directory)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=FILES))
    assert builder.info.splits["train"].shard_lengths == [PER_FILE] * FILES
    read_config = tfds.ReadConfig(interleave_cycle_length=1)
    ds = builder.as_dataset(split="train", shuffle_files=False, read_config=read_config)
    canonical = np.array([int(e["image"][0, 0, 0]) // 6 for e in ds.as_numpy_iterator()])
    assert sorted(canonical) == list(range(FILES * PER_FILE))
    source = sources.get_source("eight_files_images_for_pipeline_test", directory, in_memory=False)
    return source, canonical


def piece_order(ids, canonical, pieces):
    """The order in which one epoch of ``ids``, read without shuffle buffer, visits ``pieces``
    (``(first canonical position, count)`` of each file or part of a file, worked out by hand),
    after checking that it reads each piece whole, in the file's own order, one after the other."""
    position = {int(i): p for p, i in enumerate(canonical)}
    starts = {first: (k, count) for k, (first, count) in enumerate(pieces)}
    order, at = [], 0
    while at < len(ids):
        first = position[int(ids[at])]
        assert first in starts, f"id {ids[at]} at {at} does not start a piece"
        k, count = starts[first]
        np.testing.assert_array_equal(ids[at : at + count], canonical[first : first + count])
        order.append(k)
        at += count
    assert sorted(order) == list(range(len(pieces)))  # every piece exactly once
    return order


WHOLE_FILES = [(PER_FILE * f, PER_FILE) for f in range(FILES)]


def whole_file_orders(source, canonical, seed, epochs=3):
    ids = train_ids(source, epochs * FILES, batch=PER_FILE, seed=seed, shuffle_buffer=1)
    return [piece_order(epoch, canonical, WHOLE_FILES) for epoch in ids.reshape(epochs, -1)]


def test_streamed_files_are_read_in_a_new_order_every_epoch(eight_files):
    source, canonical = eight_files
    assert source.num_files("train") == FILES
    # Without shuffle buffer an epoch is its files one after the other (each has fewer records than
    # the interleave block of 16), so the file order can be read off the stream.
    orders = whole_file_orders(source, canonical, seed=7)
    for order in orders:
        assert sorted(order) == list(range(FILES))
    assert orders[0] != orders[1] and orders[1] != orders[2]
    assert whole_file_orders(source, canonical, seed=7) == orders
    assert whole_file_orders(source, canonical, seed=8)[0] != orders[0]
    for e, order in enumerate(orders):  # the inspection helper tells the same order
        assert pipeline.epoch_file_order(7, e, FILES).tolist() == order


def test_streamed_resume_with_shuffled_files_is_bit_identical(eight_files):
    source, canonical = eight_files
    # Batches of 6 of a 32-example epoch: step 5 holds elements 30..35 and crosses into epoch 1,
    # step 10 holds 60..65 and crosses into epoch 2.
    kwargs = dict(local_batch_size=6, seed=3, num_views=2, image_size=SIZE, preprocess=SIMCLR_VIEW)
    straight = take(pipeline.train_dataset(source, "train", shuffle_buffer=5, **kwargs), 12)
    for step in (5, 10):
        resumed = take(
            pipeline.train_dataset(source, "train", shuffle_buffer=5, start_step=step, **kwargs), 2
        )
        for a, b in zip(straight[step:], resumed):
            for key in ("image", "label", "mask"):
                np.testing.assert_array_equal(a[key], b[key])
    # Without shuffle buffer the file order shows: it changes at the epoch boundaries that the
    # resumed runs jump over, and they still read exactly the uninterrupted stream.
    ids = train_ids(source, 16, batch=6, seed=3, shuffle_buffer=1)
    orders = [piece_order(epoch, canonical, WHOLE_FILES) for epoch in ids[:64].reshape(2, -1)]
    assert orders[0] != orders[1]
    for step in (5, 10):
        resumed = train_ids(source, 2, batch=6, seed=3, shuffle_buffer=1, start_step=step)
        np.testing.assert_array_equal(resumed, ids[6 * step : 6 * step + 12])


def test_streamed_processes_cover_every_example_once_per_epoch(eight_files):
    source, canonical = eight_files
    # 3 processes own positions [0, 10), [10, 21), [21, 32): by hand, process 1 holds the last 2
    # records of file 2, files 3 and 4, and the first record of file 5.
    bounds = [(0, 10), (10, 21), (21, 32)]
    pieces = [
        [(0, 4), (4, 4), (8, 2)],
        [(10, 2), (12, 4), (16, 4), (20, 1)],
        [(21, 3), (24, 4), (28, 4)],
    ]
    epochs = 3
    streams = [
        train_ids(
            source, epochs * (hi - lo), batch=1, seed=1, process_index=k, process_count=3, shuffle_buffer=1
        )
        for k, (lo, hi) in enumerate(bounds)
    ]
    for e in range(epochs):
        seen = []
        for k, (lo, hi) in enumerate(bounds):
            epoch = streams[k][e * (hi - lo) : (e + 1) * (hi - lo)]
            assert sorted(epoch.tolist()) == sorted(canonical[lo:hi].tolist())
            seen.extend(epoch.tolist())
        assert sorted(seen) == list(range(FILES * PER_FILE))  # disjoint and complete
    for k, (lo, hi) in enumerate(bounds):
        assert source.num_files("train", k, 3) == len(pieces[k])
        epoch_length = hi - lo
        orders = [
            piece_order(streams[k][e * epoch_length : (e + 1) * epoch_length], canonical, pieces[k])
            for e in range(epochs)
        ]
        assert orders[0] != orders[1] or orders[1] != orders[2]
    # The default buffer on top keeps each process on its own share.
    shares = [
        train_ids(source, hi - lo, batch=1, seed=1, process_index=k, process_count=3)
        for k, (lo, hi) in enumerate(bounds)
    ]
    for share, (lo, hi) in zip(shares, bounds):
        assert sorted(share.tolist()) == sorted(canonical[lo:hi].tolist())


def test_streamed_eval_labels_and_subsets_keep_canonical_order(eight_files):
    source, canonical = eight_files
    np.testing.assert_array_equal(source.labels("train"), canonical % 10)
    for k, (lo, hi) in enumerate([(0, 16), (16, 32)]):
        batches = list(
            pipeline.eval_dataset(
                source, "train", local_batch_size=5, image_size=SIZE, process_index=k, process_count=2
            ).as_numpy_iterator()
        )
        index = np.concatenate([b["index"][b["mask"] == 1] for b in batches])
        ids = np.concatenate([image_ids(b["image"][b["mask"] == 1]) for b in batches])
        np.testing.assert_array_equal(index, np.arange(lo, hi))
        np.testing.assert_array_equal(ids, canonical[lo:hi])
    shard = list(source.load("train", shard_index=1, num_shards=3).as_numpy_iterator())
    np.testing.assert_array_equal([e["index"] for e in shard], np.arange(10, 21))
    np.testing.assert_array_equal([int(e["image"][0, 0, 0]) // 6 for e in shard], canonical[10:21])
    # Label subsets name canonical positions; they select the same examples whatever the file order.
    subset = [0, 5, 9, 17, 30]
    ids = train_ids(source, 3 * len(subset), batch=1, seed=2, indices=subset)
    for epoch in ids.reshape(3, -1):
        assert sorted(epoch.tolist()) == sorted(canonical[subset].tolist())
