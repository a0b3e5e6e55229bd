"""Your own images: a folder of splits, each a folder of images, labeled by class folder or not.

``dataset="image_folder"`` with ``data_dir=ROOT``::

    ROOT/train/<class>/.../*.jpg     a labeled split: its first-level folders are the classes, sorted
    ROOT/test/<class>/.../*.png        names give labels 0..C-1; images may sit at any depth below
    ROOT/unlabeled/.../*.jpg         an unlabeled split (``unlabeled_splits``): images at any depth

Split names are the config's ``train_split`` / ``eval_split`` (any names) and ``unlabeled_splits``
(comma-separated; default ``unlabeled``, STL-10's convention). Pretraining and distillation take the
training split and the unlabeled splits together (the split ``"train+unlabeled"``; unlabeled images
have the label -1); fine-tuning, linear evaluation and ``evaluate`` need a labeled split.

* **Formats.** JPEG, PNG, BMP, GIF (first frame) and WebP, by file name ending (case-insensitive); any
  size; grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images become 8-bit RGB; the EXIF
  orientation is applied. Other files and hidden files (and hidden folders) are ignored and counted in
  the log. Every input path decodes with Pillow (``decode_image_file``), so the pixels are the same with
  and without TensorFlow.
* **The index.** Listing a split (paths and labels) is done once and kept as
  ``<index home>/data_index/<split>-<hash of its path>.json.gz`` (the run's workdir while training:
  ``index_home``); it is rebuilt when a folder of the split changed since (a file added, removed or
  renamed changes its folder's modification time). A file changed in place under the same name is not
  noticed: the index lists names, not contents.
* **Bad images.** A file that does not decode (truncated, empty, not an image) stops the run with one
  error naming it and offering ``skip_bad_images=True``; with it, the bad image is replaced by the next
  file of the split that decodes (in index order, so the same batch is always made the same way and
  a resumed run stays bit-for-bit) and counted (the log, and ``results.json``'s ``skipped_bad_images``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import gzip
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from absl import logging

from simclrv2_jax.data.sources import DataSource, check_labels

IMAGE_FOLDER = "image_folder"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
INDEX_SUBDIR = "data_index"
INDEX_VERSION = 1

# Where split indexes are kept (the run's workdir while a stage trains, see ``index_home``).
_INDEX_HOME: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "simclrv2_jax_index_home", default=None
)


@contextlib.contextmanager
def index_home(directory: str | os.PathLike | None) -> Iterator[None]:
    """Within it, folder sources keep their split indexes under ``directory/data_index/``."""
    token = _INDEX_HOME.set(None if directory is None else os.fspath(directory))
    try:
        yield
    finally:
        _INDEX_HOME.reset(token)


class BadImageError(ValueError):
    """An image file that does not decode; the message names it and the fix."""


# ------------------------------------------------------------------------------------------------
# Listing a split.


@dataclasses.dataclass
class SplitIndex:
    """A split's images in a fixed order (relative paths, sorted) and their labels (-1: unlabeled)."""

    root: str
    paths: list[str]
    labels: np.ndarray
    classes: tuple[str, ...] | None  # None: an unlabeled split
    ignored: int  # files and folders skipped (other endings, hidden)
    folders: dict[str, int]  # relative folder -> its modification time (ns): what the index was made of

    def to_json(self) -> dict[str, Any]:
        return {
            "version": INDEX_VERSION,
            "root": self.root,
            "paths": self.paths,
            "labels": self.labels.tolist(),
            "classes": None if self.classes is None else list(self.classes),
            "ignored": self.ignored,
            "folders": self.folders,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SplitIndex:
        classes = data["classes"]
        return cls(
            root=data["root"],
            paths=list(data["paths"]),
            labels=np.asarray(data["labels"], np.int64),
            classes=None if classes is None else tuple(classes),
            ignored=int(data["ignored"]),
            folders={k: int(v) for k, v in data["folders"].items()},
        )

    def unchanged(self) -> bool:
        """Whether every folder the index was made of still has its modification time."""
        for folder, mtime in self.folders.items():
            try:
                if os.stat(os.path.join(self.root, folder)).st_mtime_ns != mtime:
                    return False
            except OSError:
                return False
        return True


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _walk(top: str, relative: str, folders: dict[str, int]) -> tuple[list[str], int]:
    """Image files below ``top`` (paths relative to the split root) and the count of ignored entries;
    every folder visited goes into ``folders`` with its modification time."""
    images: list[str] = []
    ignored = 0
    stack = [(top, relative)]
    while stack:
        directory, rel = stack.pop()
        folders[rel or "."] = os.stat(directory).st_mtime_ns
        with os.scandir(directory) as entries:
            for entry in entries:
                name = entry.name
                if _is_hidden(name):
                    ignored += 1
                    continue
                child = f"{rel}/{name}" if rel else name
                if entry.is_dir(follow_symlinks=True):
                    stack.append((entry.path, child))
                elif os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                    images.append(child)
                else:
                    ignored += 1
    images.sort()
    return images, ignored


def scan_split(root: str, labeled: bool) -> SplitIndex:
    """Lists a split folder (see the module docstring); errors name the folder and the fix."""
    folders: dict[str, int] = {}
    if not labeled:
        paths, ignored = _walk(root, "", folders)
        if not paths:
            raise ValueError(f"The unlabeled split {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
        return SplitIndex(root, paths, np.full(len(paths), -1, np.int64), None, ignored, folders)
    folders["."] = os.stat(root).st_mtime_ns
    classes, ignored = [], 0
    with os.scandir(root) as entries:
        for entry in entries:
            if _is_hidden(entry.name):
                ignored += 1
            elif entry.is_dir(follow_symlinks=True):
                classes.append(entry.name)
            else:
                ignored += 1  # a labeled split's images sit in class folders
    classes.sort()
    if len(classes) < 2:
        raise ValueError(
            f"The labeled split {root} has {len(classes)} class folder(s) ({', '.join(classes) or 'none'}): "
            "a labeled split needs at least two, one folder per class. For images without labels use an "
            "unlabeled split (config.unlabeled_splits)."
        )
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        images, skipped = _walk(os.path.join(root, name), name, folders)
        if not images:
            raise ValueError(
                f"The class folder {os.path.join(root, name)} holds no images "
                f"({', '.join(IMAGE_EXTENSIONS)}): add images to it or remove it."
            )
        paths += images
        labels += [label] * len(images)
        ignored += skipped
    return SplitIndex(root, paths, np.asarray(labels, np.int64), tuple(classes), ignored, folders)


def _index_path(root: str) -> str | None:
    home = _INDEX_HOME.get()
    if home is None or "://" in home:
        return None
    digest = hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:12]
    return os.path.join(home, INDEX_SUBDIR, f"{os.path.basename(root.rstrip('/'))}-{digest}.json.gz")


def load_index(root: str, labeled: bool) -> SplitIndex:
    """The split's index: the kept one when its folders are unchanged, else listed afresh (and kept)."""
    path = _index_path(root)
    if path is not None and os.path.exists(path):
        try:
            with gzip.open(path, "rt") as f:
                data = json.load(f)
            index = SplitIndex.from_json(data)
            if data.get("version") == INDEX_VERSION and index.root == root and index.unchanged():
                if (index.classes is not None) == labeled:
                    return index
        except (OSError, ValueError, KeyError):
            pass  # a damaged index is listed again
    t0 = time.time()
    index = scan_split(root, labeled)
    logging.info(
        "Listed %s: %d images%s in %.1f s; %d other or hidden files ignored.",
        root,
        len(index.paths),
        f" in {len(index.classes)} classes" if index.classes else "",
        time.time() - t0,
        index.ignored,
    )
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.{os.getpid()}.tmp"
        with gzip.open(partial, "wt") as f:
            json.dump(index.to_json(), f)
        os.replace(partial, path)
    return index


# ------------------------------------------------------------------------------------------------
# Decoding.


def decode_image_file(path: str) -> np.ndarray:
    """The image at ``path`` as uint8 ``[H, W, 3]``: EXIF orientation applied, the first frame of an
    animation, 16-bit scaled to 8 bits, grayscale / palette / CMYK converted, alpha dropped."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.load()  # decodes now: a truncated file fails here
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(image, np.float64)
            array = np.clip(np.round(array / 257.0), 0, 255).astype(np.uint8)
            return np.repeat(array[..., None], 3, axis=-1)
        if image.mode in ("P", "PA", "LA"):
            image = image.convert("RGBA")
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.asarray(image, np.uint8)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` resized (bicubic, Pillow) to a ``size x size`` square; itself when it already is one."""
    if image.shape[:2] == (size, size):
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC), np.uint8)


# ------------------------------------------------------------------------------------------------
# The source.


def _split_names(value: str | Sequence[str]) -> list[str]:
    if isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    return [s for s in value if s]


class FolderSource(DataSource):
    """The splits of an image folder (see the module docstring). ``files`` is True: its images are
    decoded from files by index, ``image_path(split, i)``, rather than held in arrays."""

    in_memory = False
    files = True

    def __init__(
        self,
        root: str,
        *,
        labeled_splits: Sequence[str],
        unlabeled_splits: str | Sequence[str] = ("unlabeled",),
        skip_bad_images: bool = False,
    ) -> None:
        self.name = IMAGE_FOLDER
        self.root = os.path.abspath(os.fspath(root)) if root else ""
        if not root or not os.path.isdir(self.root):
            raise FileNotFoundError(
                f"config.data_dir={root!r}: the image folder does not exist. Point --config.data_dir at a "
                "folder holding one folder per split (e.g. train/, test/, unlabeled/)."
            )
        found = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not _is_hidden(e.name))
        self.found = found
        self.labeled_names = [s for s in dict.fromkeys(labeled_splits) if s]
        self.unlabeled_names = [s for s in _split_names(unlabeled_splits) if s in found]
        self.skip_bad_images = skip_bad_images
        self._indexes: dict[str, SplitIndex] = {}
        self._lock = threading.Lock()
        self.bad_files: set[str] = set()
        self.image_shape = (None, None, 3)
        self.class_names: tuple[str, ...] | None = None
        labeled_present = [s for s in self.labeled_names if s in found]
        for split in labeled_present:
            index = self._index(split)
            if self.class_names is None:
                self.class_names = index.classes
            elif index.classes != self.class_names:
                first = labeled_present[0]
                missing = sorted(set(self.class_names) - set(index.classes))
                extra = sorted(set(index.classes) - set(self.class_names))
                raise ValueError(
                    f"The classes of {os.path.join(self.root, split)} differ from those of "
                    f"{os.path.join(self.root, first)}: missing {missing or 'none'}, extra "
                    f"{extra or 'none'}. Every labeled split needs the same class folders."
                )
        self.num_classes = len(self.class_names) if self.class_names else 0

    # ---- Splits.

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.found)

    def _check_split(self, split: str) -> None:
        for part in split.split("+"):
            if part not in self.found:
                raise FileNotFoundError(
                    f"The image folder {self.root} has no split {part!r} (a folder "
                    f"{os.path.join(self.root, part)}); it has {', '.join(self.found) or 'no folders'}. Set "
                    "--config.train_split / eval_split / unlabeled_splits to the folders' names."
                )

    def _index(self, split: str) -> SplitIndex:
        if split not in self._indexes:
            labeled = split in self.labeled_names and split not in self.unlabeled_names
            self._indexes[split] = load_index(os.path.join(self.root, split), labeled)
        return self._indexes[split]

    def _parts(self, split: str) -> list[SplitIndex]:
        self._check_split(split)
        return [self._index(part) for part in split.split("+")]

    def training_split(self, train_split: str) -> str:
        """The split pretraining and distillation read: the training split and the unlabeled ones."""
        parts = [train_split] if train_split in self.found else []
        parts += [s for s in self.unlabeled_names if s not in parts]
        if not parts:
            self._check_split(train_split)
        return "+".join(parts)

    def require_labels(self, split: str, why: str) -> None:
        """An error when ``split`` is not a labeled split (``why`` says who needs the labels)."""
        self._check_split(split)
        if any(index.classes is None for index in self._parts(split)):
            raise ValueError(
                f"{why} needs labels, but {os.path.join(self.root, split)} is an unlabeled split. Point it "
                "at a labeled split: a folder with one folder of images per class."
            )

    def num_examples(self, split: str) -> int:
        return sum(len(index.paths) for index in self._parts(split))

    def labels(self, split: str) -> np.ndarray:
        labels = np.concatenate([index.labels for index in self._parts(split)])
        labeled = labels[labels >= 0]
        check_labels(labeled, max(self.num_classes, 1), os.path.join(self.root, split))
        return labels

    def image_paths(self, split: str) -> list[str]:
        return [os.path.join(index.root, p) for index in self._parts(split) for p in index.paths]

    def relative_paths(self, split: str) -> list[str]:
        """Each image's path relative to its split folder (what ``label_list`` files name)."""
        return [p for index in self._parts(split) for p in index.paths]

    # ---- Decoding, with bad images reported or skipped.

    def decode(self, paths: Sequence[str], position: int) -> np.ndarray:
        """The image ``paths[position]``; a bad file is an error naming it, or with ``skip_bad_images``
        replaced by the next file (in index order) that decodes."""
        for offset in range(len(paths)):
            path = paths[(position + offset) % len(paths)]
            try:
                return decode_image_file(path)
            except Exception as e:  # Pillow raises OSError, UnidentifiedImageError, ValueError, ...
                if not self.skip_bad_images:
                    raise BadImageError(
                        f"The image {path} does not decode ({type(e).__name__}: {e}). Fix or remove the "
                        "file, or pass --config.skip_bad_images=True to skip such files (they are counted); "
                        "the run's checkpoints are kept and it resumes where it stopped."
                    ) from None
                with self._lock:
                    new = path not in self.bad_files
                    self.bad_files.add(path)
                if new:
                    logging.warning("Skipping %s, which does not decode (%s).", path, type(e).__name__)
        raise BadImageError(f"No image of the split {self.root} decodes.")

    def info(self) -> dict[str, Any]:
        return {"skipped_bad_images": len(self.bad_files), "class_names": list(self.class_names or ())}
