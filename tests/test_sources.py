"""Data sources: IDX parsing, tfds data sets, label-fraction subsets."""

import gzip
import os
import re

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from simclrv2_jax.data import sources, subsets

IDX_NAMES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def write_idx(path, array):
    """Written from the IDX description: 0, 0, type code (0x08 = ubyte), ndim, big-endian dims."""
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def write_fake_fashion_mnist(directory, n_train=12, n_test=5, height=6, width=5):
    rng = np.random.default_rng(0)
    data = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, height, width), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        write_idx(os.path.join(directory, IDX_NAMES[split][0]), images)
        write_idx(os.path.join(directory, IDX_NAMES[split][1]), labels)
        data[split] = (images, labels)
    return data


def test_fake_idx_files_read_back(tmp_path):
    data = write_fake_fashion_mnist(tmp_path)
    source = sources.get_source("fashion_mnist", data_dir=str(tmp_path))
    assert source.in_memory and source.num_classes == 10
    assert source.image_shape == (6, 5, 3)
    assert source.num_examples("train") == 12 and source.num_examples("test") == 5
    images, labels = source.arrays("train")
    assert images.dtype == np.uint8
    for c in range(3):  # grayscale tiled to three identical channels
        np.testing.assert_array_equal(images[..., c], data["train"][0])
    np.testing.assert_array_equal(labels, data["train"][1])
    np.testing.assert_array_equal(source.labels("test"), data["test"][1])
    examples = list(source.load("test").as_numpy_iterator())
    assert [int(e["index"]) for e in examples] == list(range(5))
    for i, e in enumerate(examples):
        np.testing.assert_array_equal(e["image"][..., 1], data["test"][0][i])
        assert e["label"] == data["test"][1][i] and e["label"].dtype == np.int64


def test_missing_fashion_mnist_names_paths_and_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DEFAULT_FASHION_MNIST_DIR", str(tmp_path / "not_installed"))
    with pytest.raises(FileNotFoundError) as info:
        sources.get_source("fashion_mnist", data_dir=str(tmp_path / "empty"))
    message = str(info.value)
    assert str(tmp_path / "empty") in message and str(tmp_path / "not_installed") in message
    assert "apt-get install dataset-fashion-mnist" in message and "data_dir" in message


def test_corrupt_idx_is_rejected(tmp_path):
    path = str(tmp_path / "bad.gz")
    with gzip.open(path, "wb") as f:
        f.write(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        sources.read_idx(path)
    with gzip.open(path, "wb") as f:  # header says 10 bytes, 3 follow
        f.write(bytes([0, 0, 8, 1]) + np.asarray([10], ">u4").tobytes() + b"abc")
    with pytest.raises(ValueError, match="10"):
        sources.read_idx(path)


def damage(path, how):
    """Damages a gzipped IDX file as a failed download or copy would."""
    data = path.read_bytes()
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "not_gzip":
        data = b"<html>404 Not Found</html>\n"
    elif how == "corrupt":  # a wrong CRC-32 in the gzip trailer (its last 8 bytes: CRC, length)
        data = data[:-8] + bytes([data[-8] ^ 0xFF]) + data[-7:]
    elif how == "empty":
        data = b""
    path.write_bytes(data)


@pytest.mark.parametrize(
    "how, says",
    [("truncated", "truncated"), ("not_gzip", "not a gzip file"), ("corrupt", "corrupt"), ("empty", "empty")],
)
def test_damaged_gz_names_the_file_and_the_fix(tmp_path, how, says):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    # Incompressible pixels: half of the file is half of the deflate stream.
    write_idx(path, np.random.default_rng(0).integers(0, 256, size=(20, 8, 8), dtype=np.uint8))
    damage(path, how)
    with pytest.raises(ValueError) as info:
        sources.read_idx(str(path))
    message = str(info.value)
    assert str(path) in message and says in message, message
    assert "dataset-fashion-mnist" in message and "--config.data_dir" in message
    assert "\n" not in message


def test_damaged_gz_in_data_dir_stops_loading(tmp_path):
    write_fake_fashion_mnist(tmp_path)
    damage(tmp_path / IDX_NAMES["test"][1], "truncated")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / IDX_NAMES["test"][1]))):
        sources.get_source("fashion_mnist", data_dir=str(tmp_path))


@pytest.mark.skipif(
    not os.path.isdir(sources.DEFAULT_FASHION_MNIST_DIR), reason="dataset-fashion-mnist is not installed"
)
def test_real_fashion_mnist():
    source = sources.get_source("fashion_mnist")
    assert source.num_examples("train") == 60000 and source.num_examples("test") == 10000
    assert source.num_classes == 10 and source.image_shape == (28, 28, 3)
    np.testing.assert_array_equal(np.bincount(source.labels("train")), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(source.labels("test")), [1000] * 10)
    # The first training images are an ankle boot, two T-shirts, a dress, a T-shirt.
    np.testing.assert_array_equal(source.labels("train")[:5], [9, 0, 0, 3, 0])


# ------------------------------------------------------------------------------------------------
# tfds data sets (a tiny one built offline in tmp).


class TinyGrayImagesForSourcesTest(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1)),
                    "label": tfds.features.ClassLabel(num_classes=3),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(40), "test": self._generate_examples(4)}

    def _generate_examples(self, n):
        for i in range(n):
            # The pixel value identifies the example, the label is a function of it.
            yield i, {"image": np.full((8, 8, 1), 6 * i, np.uint8), "label": i % 3}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tfds"))
    # Two files of 20 examples: more than tfds's interleave block of 16, so reading them
    # interleaved would change the order.
    TinyGrayImagesForSourcesTest(data_dir=directory).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=2)
    )
    return directory


def test_tfds_source_streaming_and_in_memory(tfds_dir):
    name = "tiny_gray_images_for_sources_test"
    streamed = sources.get_source(name, tfds_dir, in_memory=False)
    in_memory = sources.get_source(name, tfds_dir)  # small: loaded into memory by default
    assert not streamed.in_memory and in_memory.in_memory
    for source in (streamed, in_memory):
        assert source.num_classes == 3 and source.image_shape == (8, 8, 3)
        assert source.num_examples("train") == 40
        examples = list(source.load("train").as_numpy_iterator())
        assert [int(e["index"]) for e in examples] == list(range(40))
        ids = [int(e["image"][0, 0, 0]) // 6 for e in examples]
        assert sorted(ids) == list(range(40))
        for e, i in zip(examples, ids):
            assert e["image"].shape == (8, 8, 3) and np.all(e["image"] == 6 * i)
            assert e["label"] == i % 3
        np.testing.assert_array_equal(source.labels("train"), [i % 3 for i in ids])
        # Shards are disjoint and cover the split, with the split's own indices.
        shards = [
            list(source.load("train", shard_index=k, num_shards=3).as_numpy_iterator()) for k in range(3)
        ]
        seen = sorted(int(e["index"]) for shard in shards for e in shard)
        assert seen == list(range(40))
        for shard in shards:
            for e in shard:
                assert int(e["image"][0, 0, 0]) == 6 * ids[int(e["index"])]
    encoded = next(iter(streamed.load("test", decode=False)))
    assert encoded["image"].dtype == tf.string
    assert streamed.decode_image(encoded["image"]).shape == (8, 8, 3)


def test_unprepared_tfds_dataset_says_how_to_build(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build cifar10"):
        sources.get_source("cifar10", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="Unknown data set"):
        sources.get_source("no_such_dataset_xyz", data_dir=str(tmp_path))


# ------------------------------------------------------------------------------------------------
# Label fractions.


def _labels():
    # Unbalanced on purpose: 50, 80, 120 examples of classes 0, 1, 2, interleaved.
    labels = np.array([0] * 50 + [1] * 80 + [2] * 120)
    return np.random.default_rng(1).permutation(labels)


def test_label_fraction_subset_is_class_balanced():
    labels = _labels()
    subset = subsets.label_fraction_subset(labels, num_classes=3, per_class=20, seed=0)
    assert subset.dtype == np.int64 and np.all(np.diff(subset) > 0)
    np.testing.assert_array_equal(np.bincount(labels[subset], minlength=3), [20, 20, 20])
    # fraction: round(0.2 * 250 / 3) = 17 per class.
    subset = subsets.label_fraction_subset(labels, num_classes=3, fraction=0.2, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[subset], minlength=3), [17, 17, 17])


def test_fashion_mnist_one_percent_is_60_per_class():
    labels = np.repeat(np.arange(10), 6000)
    subset = subsets.label_fraction_subset(labels, num_classes=10, fraction=0.01, seed=3)
    assert len(subset) == 600
    np.testing.assert_array_equal(np.bincount(labels[subset]), [60] * 10)


def test_label_fraction_subset_seeds():
    labels = _labels()
    a = subsets.label_fraction_subset(labels, num_classes=3, per_class=10, seed=0)
    b = subsets.label_fraction_subset(labels, num_classes=3, per_class=10, seed=0)
    c = subsets.label_fraction_subset(labels, num_classes=3, per_class=10, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_label_fraction_subset_errors():
    labels = _labels()
    with pytest.raises(ValueError, match="fewer"):
        subsets.label_fraction_subset(labels, num_classes=3, per_class=51)
    with pytest.raises(ValueError, match="exactly one"):
        subsets.label_fraction_subset(labels, num_classes=3)
    with pytest.raises(ValueError, match="exactly one"):
        subsets.label_fraction_subset(labels, num_classes=3, fraction=0.1, per_class=5)
    for fraction in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            subsets.label_fraction_subset(labels, num_classes=3, fraction=fraction)


def test_labeled_split():
    assert subsets.labeled_split("imagenet2012", 0.01) == ("imagenet2012_subset/1pct", "train")
    assert subsets.labeled_split("imagenet2012", 0.1) == ("imagenet2012_subset/10pct", "train")
    assert subsets.labeled_split("imagenet2012", 0.5) is None
    assert subsets.labeled_split("cifar10", 0.01) is None
