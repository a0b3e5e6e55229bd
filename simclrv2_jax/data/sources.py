"""Data sources: where the images come from, in a fixed order, before any augmentation.

A ``DataSource`` yields ``{'image': uint8 [H, W, C], 'label': int64, 'index': int64}`` in the
split's canonical (unshuffled) order, ``index`` being the example's position in the split. The
input pipeline shards, shuffles and augments on top of that; label fractions are chosen here.

Two kinds exist:
  * in memory (Fashion-MNIST from its IDX files, and small tfds data sets such as CIFAR-10): the
    whole split is a NumPy array, so a permutation is a cheap gather and resume is trivial;
  * streaming (large tfds data sets such as ImageNet): examples are read from the tfds files, and
    images may stay JPEG-encoded until after shuffling (``decode=False`` + ``decode_image``). Besides
    the canonical order, a streaming source can read a shard's files in any order the caller gives
    (``num_files`` + ``load_files``), interleaved but with every ``index`` still canonical: the
    training input reads them in a new order every epoch.

Single-channel images are tiled to 3 channels, so that the same model, the same colour
augmentations and the same published checkpoints apply to every data set (colour jitter and
grayscale on a tiled image only move brightness/contrast, as they would on a gray photograph).

TensorFlow is imported only by what returns tf.data datasets (``load``) or reads tfds files; the
in-memory sources' arrays need NumPy alone.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import math
import os
import zlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf

FASHION_MNIST = "fashion_mnist"
# The Debian package `dataset-fashion-mnist` installs the original IDX files here.
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# Label i's name, as the data set's authors list them.
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# How ``load_files`` interleaves a shard's files: tfds's defaults, which the authors' input read the
# ImageNet training files with (16 files open, 16 consecutive records from each in turn).
INTERLEAVE_CYCLE_LENGTH = 16
INTERLEAVE_BLOCK_LENGTH = 16
# Data sets at most this big (examples and pixels per side) are loaded into memory.
MAX_IN_MEMORY_EXAMPLES = 200_000
MAX_IN_MEMORY_SIDE = 64

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _to_three_channels(images: np.ndarray) -> np.ndarray:
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return np.ascontiguousarray(images, dtype=np.uint8)


class DataSource:
    """Base class; use ``get_source``. Attributes: ``name``, ``num_classes``, ``image_shape``
    (H, W, C after the 3-channel conversion; H and W are None for variable-size images) and
    ``in_memory``."""

    name: str
    num_classes: int
    image_shape: tuple[int | None, int | None, int]
    in_memory: bool
    class_names: tuple[str, ...] | None = None  # label i's name, where the data set has them

    @property
    def splits(self) -> tuple[str, ...]:
        raise NotImplementedError

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(
                f"Data set {self.name!r} has no split {split!r}; available: {', '.join(self.splits)}."
            )

    def num_examples(self, split: str) -> int:
        raise NotImplementedError

    def load(
        self, split: str, *, shard_index: int = 0, num_shards: int = 1, decode: bool = True
    ) -> tf.data.Dataset:
        """The split (or one shard of it) in canonical order; see the module docstring.

        With ``decode=False`` the image may be left in a source-specific encoded form; pass it through
        ``decode_image`` to get the uint8 ``[H, W, C]`` image.
        """
        raise NotImplementedError

    def num_files(self, split: str, shard_index: int = 0, num_shards: int = 1) -> int:
        """How many record files (or parts of files) one shard is stored in; ``load_files`` reads them
        in a given order. A source not stored in files is one file: ``load`` reads it."""
        return 1

    def load_files(
        self,
        split: str,
        file_order,
        *,
        shard_index: int = 0,
        num_shards: int = 1,
        decode: bool = True,
    ) -> tf.data.Dataset:
        """The shard with its ``num_files`` files read in ``file_order`` (a permutation of
        ``range(num_files)``, possibly a tensor); each example keeps its canonical ``index``."""
        del file_order  # One file: there is only one order.
        return self.load(split, shard_index=shard_index, num_shards=num_shards, decode=decode)

    def decode_image(self, image: tf.Tensor) -> tf.Tensor:
        return image

    def labels(self, split: str) -> np.ndarray:
        raise NotImplementedError

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        raise TypeError(f"Data set {self.name!r} is streamed from files, not held in memory.")

    def shard_bounds(self, split: str, shard_index: int, num_shards: int) -> np.ndarray:
        """Example indices of one shard, as ``load(split, shard_index=..., num_shards=...)`` reads."""
        raise NotImplementedError


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """One error naming ``where`` and the bad values when a label lies outside ``[0, num_classes)``."""
    labels = np.asarray(labels)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        values = np.unique(bad)
        shown = ", ".join(str(int(v)) for v in values[:10]) + (" ..." if len(values) > 10 else "")
        raise ValueError(
            f"{where} has {bad.size} label(s) outside [0, {num_classes}): {shown}. The data set has "
            f"{num_classes} classes, so labels must be 0..{num_classes - 1}; fix the labels or the data set."
        )


def _check_shard(shard_index: int, num_shards: int) -> None:
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index}.")


@dataclasses.dataclass(eq=False)
class InMemorySource(DataSource):
    """A data set held as NumPy arrays: ``data[split] = (images uint8 [N, H, W, C], labels [N])``.

    Shards are strided (example ``i`` goes to shard ``i % num_shards``), so shard sizes differ by
    at most one.
    """

    name: str
    num_classes: int
    data: dict[str, tuple[np.ndarray, np.ndarray]]
    class_names: tuple[str, ...] | None = None
    # Where each split was read from (a file or folder), named when its labels are out of range.
    origins: dict[str, str] = dataclasses.field(default_factory=dict)
    in_memory: bool = dataclasses.field(default=True, init=False)

    def __post_init__(self):
        self.data = {
            split: (_to_three_channels(images), np.asarray(labels, np.int64))
            for split, (images, labels) in self.data.items()
        }
        for split, (_, labels) in self.data.items():
            check_labels(labels, self.num_classes, self.origins.get(split, f"{self.name!r}/{split}"))
        shapes = {images.shape[1:] for images, _ in self.data.values()}
        if len(shapes) != 1:
            raise ValueError(f"All splits of {self.name!r} must share one image shape, got {shapes}.")
        self.image_shape = tuple(int(d) for d in shapes.pop())

    @property
    def splits(self):
        return tuple(self.data)

    def num_examples(self, split):
        self._check_split(split)
        return len(self.data[split][1])

    def arrays(self, split):
        self._check_split(split)
        return self.data[split]

    def labels(self, split):
        return self.arrays(split)[1]

    def shard_bounds(self, split, shard_index, num_shards):
        _check_shard(shard_index, num_shards)
        return np.arange(shard_index, self.num_examples(split), num_shards, dtype=np.int64)

    def load(self, split, *, shard_index=0, num_shards=1, decode=True):
        from simclrv2_jax.data.tf_cpu import tf

        images, labels = self.arrays(split)
        index = self.shard_bounds(split, shard_index, num_shards)
        return tf.data.Dataset.from_tensor_slices(
            {"image": images[index], "label": labels[index], "index": index}
        )


class TfdsSource(DataSource):
    """A prepared tensorflow-datasets data set read from its files (streaming).

    Shards are contiguous ranges ``[n*i//k, n*(i+1)//k)`` read with tfds absolute slicing, so each
    process opens only its own part of the files. The canonical order is tfds's: the split's files
    one after the other (``shuffle_files=False``, one file at a time). ``load_files`` reads a shard's
    files (its ``FileInstruction``s: a file, or the part of one that the shard holds) in any order.
    """

    def __init__(self, builder, name: str | None = None):
        self.builder = builder
        self.name = name or builder.info.full_name
        keys = builder.info.supervised_keys
        if not keys or len(keys) != 2:
            raise ValueError(f"tfds data set {builder.name!r} has no (image, label) supervised keys.")
        self.image_key, self.label_key = keys
        features = builder.info.features
        self.num_classes = int(features[self.label_key].num_classes)
        names = getattr(features[self.label_key], "names", None)
        self.class_names = tuple(names) if names else None
        height, width, channels = features[self.image_key].shape
        self._source_channels = int(channels)
        self.image_shape = (height, width, 3 if channels == 1 else int(channels))
        self.in_memory = False

    @property
    def splits(self):
        return tuple(self.builder.info.splits.keys())

    def num_examples(self, split):
        self._check_split(split)
        return int(self.builder.info.splits[split].num_examples)

    def shard_bounds(self, split, shard_index, num_shards):
        _check_shard(shard_index, num_shards)
        n = self.num_examples(split)
        return np.arange(n * shard_index // num_shards, n * (shard_index + 1) // num_shards, dtype=np.int64)

    def _sliced(self, split, shard_index, num_shards) -> tuple[str, int]:
        bounds = self.shard_bounds(split, shard_index, num_shards)
        start = int(bounds[0]) if len(bounds) else 0
        return f"{split}[{start}:{start + len(bounds)}]", start

    def _read(self, split, shard_index, num_shards, decoders):
        import tensorflow_datasets as tfds

        sliced, start = self._sliced(split, shard_index, num_shards)
        # tfds interleaves 16 files by default, which makes the order depend on how the split is
        # sliced; one file at a time keeps positions canonical, so shards agree with labels().
        read_config = tfds.ReadConfig(try_autocache=False, interleave_cycle_length=1)
        ds = self.builder.as_dataset(
            split=sliced, shuffle_files=False, decoders=decoders, read_config=read_config
        )
        return ds.enumerate(start=start)

    def _file_instructions(self, split, shard_index, num_shards):
        """The shard's tfds ``FileInstruction``s (path, skip, take) in canonical order, each with the
        canonical index of its first example."""
        if not len(self.shard_bounds(split, shard_index, num_shards)):
            return []
        sliced, start = self._sliced(split, shard_index, num_shards)
        instructions = [f for f in self.builder.info.splits[sliced].file_instructions if f.take > 0]
        firsts = start + np.cumsum([0] + [f.take for f in instructions[:-1]], dtype=np.int64)
        return list(zip(instructions, firsts.tolist()))

    def num_files(self, split, shard_index=0, num_shards=1):
        return len(self._file_instructions(split, shard_index, num_shards))

    def _convert(self, ds, decode):
        from simclrv2_jax.data.tf_cpu import tf

        def convert(index, example):
            image = example[self.image_key]
            if decode:
                image = self.decode_image(image, already_decoded=True)
            return {
                "image": image,
                "label": tf.cast(example[self.label_key], tf.int64),
                "index": tf.cast(index, tf.int64),
            }

        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def _decoders(self, decode):
        import tensorflow_datasets as tfds

        return None if decode else {self.image_key: tfds.decode.SkipDecoding()}

    def load(self, split, *, shard_index=0, num_shards=1, decode=True):
        return self._convert(self._read(split, shard_index, num_shards, self._decoders(decode)), decode)

    def load_files(self, split, file_order, *, shard_index=0, num_shards=1, decode=True):
        """The shard's files read in ``file_order``, ``INTERLEAVE_CYCLE_LENGTH`` at a time with
        ``INTERLEAVE_BLOCK_LENGTH`` consecutive records from each in turn (deterministically: the
        order depends on ``file_order`` alone). Records are read with the data set's tfds file
        adapter and parsed with its features, as ``builder.as_dataset`` does; ``index`` is canonical.
        """
        from tensorflow_datasets.core import file_adapters

        from simclrv2_jax.data.tf_cpu import tf

        instructions = self._file_instructions(split, shard_index, num_shards)
        if not instructions:
            raise ValueError(f"Shard {shard_index} of {num_shards} of {self.name!r}/{split} is empty.")
        file_format = file_adapters.FileFormat.from_value(
            self.builder.info.file_format or file_adapters.DEFAULT_FILE_FORMAT
        )
        adapter = file_adapters.ADAPTER_FOR_FORMAT[file_format]
        if not adapter.SUPPORTS_TF_DATA:
            raise ValueError(
                f"tfds data set {self.name!r} is stored as {file_format.value}, which tf.data cannot "
                f"stream; rebuild it with `tfds build {self.builder.name} --file_format=tfrecord`."
            )
        order = tf.convert_to_tensor(file_order, tf.int64)
        files = tf.data.Dataset.from_tensor_slices(
            tuple(
                tf.gather(tf.constant(column), order)
                for column in (
                    [os.fspath(f.filename) for f, _ in instructions],
                    np.array([f.skip for f, _ in instructions], np.int64),
                    np.array([f.take for f, _ in instructions], np.int64),
                    np.array([first for _, first in instructions], np.int64),
                )
            )
        )

        def read_file(path, skip, take, first):
            records = adapter.make_tf_data(path).skip(skip).take(take)
            return tf.data.Dataset.zip((tf.data.Dataset.range(first, first + take), records))

        ds = files.interleave(
            read_file,
            cycle_length=INTERLEAVE_CYCLE_LENGTH,
            block_length=INTERLEAVE_BLOCK_LENGTH,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        features, decoders = self.builder.info.features, self._decoders(decode)
        ds = ds.map(
            lambda index, record: (index, features.deserialize_example(record, decoders=decoders)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        return self._convert(ds, decode)

    def decode_image(self, image, already_decoded=False):
        from simclrv2_jax.data.tf_cpu import tf

        if not already_decoded:
            image = self.builder.info.features[self.image_key].decode_example(image)
        if self._source_channels == 1:
            image = tf.tile(image, [1, 1, 3])
        return image

    def labels(self, split):
        # Skipping image decoding makes this a fast scan even for ImageNet.
        ds = self._read(split, 0, 1, self._decoders(decode=False))
        ds = ds.map(lambda _, ex: ex[self.label_key]).batch(65536)
        return np.concatenate([np.asarray(x, np.int64) for x in ds.as_numpy_iterator()])


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST from IDX files.


_GZIP_MAGIC = b"\x1f\x8b"
_DAMAGED_FILE_FIX = (
    "Copy the file again, re-install the Debian package if it came from there (`sudo apt-get install "
    "--reinstall dataset-fashion-mnist`), or point --config.data_dir at a directory with intact files."
)


def _read_file(path: str) -> bytes:
    """The file's bytes, un-gzipped if its name ends in .gz; a damaged file is a ValueError naming it."""
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty (0 bytes): an interrupted download or copy? {_DAMAGED_FILE_FIX}")
    if not path.endswith(".gz"):
        with open(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        head = f.read(len(_GZIP_MAGIC))
    if not _GZIP_MAGIC.startswith(head):
        raise ValueError(
            f"{path} is not a gzip file (it starts with {head!r}, not {_GZIP_MAGIC!r}), though its name "
            f"ends in .gz. {_DAMAGED_FILE_FIX}"
        )
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        if isinstance(e, EOFError):
            problem = (
                "is truncated: its gzip stream ends before its end marker (an interrupted download or copy?)"
            )
        else:
            problem = f"is corrupt: its gzip data does not decompress ({e})"
        raise ValueError(f"{path} {problem}. {_DAMAGED_FILE_FIX}") from e


def read_idx(path: str) -> np.ndarray:
    """Reads a (gzipped) IDX file: 2 zero bytes, a dtype code, ndim, then big-endian uint32 dims."""
    path = os.fspath(path)
    try:
        data = _read_file(path)
    except PermissionError as e:
        raise ValueError(f"{path} cannot be read ({e.strerror}): fix its permissions.") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4]!r}).")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = offset + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"{path}: IDX header announces shape {dims} ({expected} bytes) but the file "
            f"holds {len(data)} bytes."
        )
    array = np.frombuffer(data, dtype, count=math.prod(dims), offset=offset).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def _fashion_mnist_dir(data_dir: str | None) -> str:
    # An explicit data_dir is the only place looked at: silently falling back to the Debian package
    # would train on other data than the user named.
    candidates = [os.fspath(data_dir)] if data_dir else [DEFAULT_FASHION_MNIST_DIR]
    needed = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
    for directory in candidates:
        if all(os.path.isfile(os.path.join(directory, name)) for name in needed):
            return directory
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files not found. Looked for {', '.join(needed)} in: "
        f"{', '.join(candidates)}. Install them with `sudo apt-get install dataset-fashion-mnist` "
        f"(puts them in {DEFAULT_FASHION_MNIST_DIR}) or pass --config.data_dir=DIR with a "
        f"directory holding the four files."
    )


def load_fashion_mnist(data_dir: str | None = None) -> InMemorySource:
    directory = _fashion_mnist_dir(data_dir)
    logging.info("Reading Fashion-MNIST from %s", directory)
    data = {}
    for split, (image_file, label_file) in FASHION_MNIST_FILES.items():
        images = read_idx(os.path.join(directory, image_file))
        labels = read_idx(os.path.join(directory, label_file))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"Fashion-MNIST {split} files in {directory} do not match: images "
                f"{images.shape}, labels {labels.shape}."
            )
        data[split] = (images, labels)
    origins = {split: os.path.join(directory, files[1]) for split, files in FASHION_MNIST_FILES.items()}
    return InMemorySource(
        name=FASHION_MNIST, num_classes=10, data=data, class_names=FASHION_MNIST_CLASSES, origins=origins
    )


# ------------------------------------------------------------------------------------------------
# Entry points.


def _tfds_builder(dataset: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(dataset, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"Unknown data set {dataset!r}: neither {FASHION_MNIST!r} nor a tfds "
            f"name (e.g. cifar10, imagenet2012, imagenet2012_subset/1pct)."
        ) from e
    if not builder.is_prepared():
        where = data_dir or "~/tensorflow_datasets"
        raise FileNotFoundError(
            f"tfds data set {dataset!r} is not prepared in {where}. Build it with "
            f"`tfds build {dataset} --data_dir={where}` (ImageNet needs the archives placed in "
            f"{where}/downloads/manual first), or point --config.data_dir at a directory where it is."
        )
    return builder


def _fits_in_memory(builder) -> bool:
    height, width, _ = builder.info.features[builder.info.supervised_keys[0]].shape
    total = sum(int(s.num_examples) for s in builder.info.splits.values())
    return (
        height is not None
        and width is not None
        and max(height, width) <= MAX_IN_MEMORY_SIDE
        and total <= MAX_IN_MEMORY_EXAMPLES
    )


def _tfds_to_memory(source: TfdsSource) -> InMemorySource:
    data = {}
    for split in source.splits:
        images, labels = [], []
        for batch in source.load(split).batch(4096).as_numpy_iterator():
            images.append(batch["image"])
            labels.append(batch["label"])
        data[split] = (np.concatenate(images), np.concatenate(labels))
    return InMemorySource(
        name=source.name, num_classes=source.num_classes, data=data, class_names=source.class_names
    )


def get_source(dataset: str, data_dir: str | None = None, *, in_memory: bool | None = None) -> DataSource:
    """The data source named ``dataset``.

    ``fashion_mnist`` is read from its IDX files (``data_dir`` when it holds them, else the Debian
    package's directory). Any other name is a prepared tfds data set in ``data_dir``; small ones are
    loaded into memory unless ``in_memory`` says otherwise.
    """
    if dataset == FASHION_MNIST:
        if in_memory is False:
            raise ValueError("Fashion-MNIST is always held in memory.")
        return load_fashion_mnist(data_dir)
    source = TfdsSource(_tfds_builder(dataset, data_dir), name=dataset)
    if in_memory is None:
        in_memory = _fits_in_memory(source.builder)
    return _tfds_to_memory(source) if in_memory else source
