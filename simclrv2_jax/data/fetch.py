"""Fashion-MNIST where the Debian package is not installed: fetched with tfds, stored as IDX files.

The project reads Fashion-MNIST from its four original IDX files (``sources.load_fashion_mnist``),
which the Debian package ``dataset-fashion-mnist`` installs offline. Elsewhere (a Colab runtime, a
laptop without apt) ``download_fashion_mnist`` fetches the data set with tensorflow-datasets (which
needs the internet) and writes the same four files, so every later step reads one format:
``--config.data_dir=DIR`` or ``sources.get_source("fashion_mnist", DIR)``.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Mapping

import numpy as np

from simclrv2_jax.data.sources import FASHION_MNIST_FILES

_UNSIGNED_BYTE = 0x08


def has_fashion_mnist(directory: str | os.PathLike | None) -> bool:
    """Whether ``directory`` holds the four Fashion-MNIST IDX files (not whether they are intact)."""
    if not directory:
        return False
    names = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
    return all(os.path.isfile(os.path.join(directory, name)) for name in names)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """A gzipped IDX file of unsigned bytes: two zero bytes, type 0x08, ndim, big-endian uint32 sizes."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"IDX files here hold uint8 arrays; got {array.dtype} for {path}.")
    header = bytes([0, 0, _UNSIGNED_BYTE, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array).tobytes())


def write_fashion_mnist(
    directory: str | os.PathLike, splits: Mapping[str, tuple[np.ndarray, np.ndarray]]
) -> str:
    """Writes ``{"train": (images, labels), "test": (...)}`` as the four IDX files; returns the directory.

    Images are uint8 ``[N, 28, 28]`` (a trailing channel of 1 is dropped), labels ``[N]`` in 0..9.
    """
    if set(splits) != set(FASHION_MNIST_FILES):
        raise ValueError(
            f"Fashion-MNIST needs the splits {sorted(FASHION_MNIST_FILES)}; got {sorted(splits)}."
        )
    os.makedirs(directory, exist_ok=True)
    for split, (images, labels) in splits.items():
        images = np.asarray(images)
        if images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]
        labels = np.asarray(labels)
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise ValueError(f"{split}: images {images.shape} and labels {labels.shape} do not match.")
        image_file, label_file = FASHION_MNIST_FILES[split]
        write_idx(os.path.join(directory, image_file), images.astype(np.uint8))
        write_idx(os.path.join(directory, label_file), labels.astype(np.uint8))
    return os.fspath(directory)


def download_fashion_mnist(directory: str | os.PathLike, tfds_data_dir: str | None = None) -> str:
    """Fetches Fashion-MNIST with tensorflow-datasets (internet needed) and writes it to ``directory``
    as IDX files, unless they are there already; returns ``directory``."""
    if has_fashion_mnist(directory):
        return os.fspath(directory)
    import tensorflow_datasets as tfds

    from simclrv2_jax.data.tf_cpu import tf  # noqa: F401  (hides the accelerators from TensorFlow)

    splits = {}
    for split in FASHION_MNIST_FILES:
        ds = tfds.load("fashion_mnist", split=split, as_supervised=True, data_dir=tfds_data_dir)
        images, labels = [], []
        for image, label in tfds.as_numpy(ds.batch(10_000)):
            images.append(image)
            labels.append(label)
        splits[split] = (np.concatenate(images), np.concatenate(labels))
    return write_fashion_mnist(directory, splits)
