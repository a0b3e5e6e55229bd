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
