"""Config -> a stage's input: where the images come from, and where they are augmented.

Two ways to augment, chosen by ``augment_on_device`` (``None`` = automatic):

* **on the host** (tf.data, ``data/pipeline.py``): every view is cropped, flipped and coloured by
  TensorFlow ops on the CPU and the step receives finished views; pretraining's Gaussian blur runs in
  the step all the same, as the release applies it in the model (``batch_random_blur``);
* **on the device** (``data/device_augment.py``): the host only batches the stored images (in-memory
  data: NumPy indexing, no TensorFlow at all; streamed tfds data: decode and resize to a fixed size in
  tf.data) and the same augmentations run batched inside the jitted step, with per-example random
  numbers drawn from ``fold_in(rng, step)``, so a resumed run is still bit-for-bit the uninterrupted
  one. Evaluation images of in-memory data are resized/centre-cropped on the device as well.

Automatic choice (``augment_on_device=None``): the device on an accelerator backend, and wherever
TensorFlow is missing. On the CPU backend in-memory data (small images) goes to the device, where it
does not compete with tf.data threads for the same cores, and streamed data (full-size JPEGs) stays
on the host, whose tf.data ops augment large views faster per core than XLA's CPU backend (the
measurements behind the choice: ``benchmarks/README.md``, input pipeline).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from simclrv2_jax.data import array_pipeline, device_augment, folder_pipeline, folders, sources, subsets
from simclrv2_jax.data.views import CROP_AREA_RANGE, CROP_PROPORTION, SMALL_IMAGE_SIZE
from simclrv2_jax.train import parallel

# Streamed images are resized to image_size / CROP_PROPORTION on the host before the device crops them,
# the size from which the release's evaluation takes its centre crop.
_HOST_RESIZE_FACTOR = 1 / CROP_PROPORTION


def load_source(config: ml_collections.ConfigDict) -> sources.DataSource:
    """The config's data set: an image folder (``dataset="image_folder"``), Fashion-MNIST or tfds."""
    if config.dataset == folders.IMAGE_FOLDER:
        return folders.FolderSource(
            config.data_dir,
            labeled_splits=[config.train_split, config.eval_split],
            unlabeled_splits=config.get("unlabeled_splits", "unlabeled"),
            skip_bad_images=config.get("skip_bad_images", False),
        )
    return sources.get_source(config.dataset, config.data_dir or None)


def is_folder(source: sources.DataSource) -> bool:
    return getattr(source, "files", False)


def unlabeled_split(config: ml_collections.ConfigDict, source: sources.DataSource) -> str:
    """The split pretraining and distillation read: for an image folder the training split and the
    unlabeled splits together, elsewhere the training split."""
    return source.training_split(config.train_split) if is_folder(source) else config.train_split


def require_labels(source: sources.DataSource, split: str, why: str) -> None:
    """One error when ``why`` (fine-tuning, evaluation...) would read labels from an unlabeled split."""
    if is_folder(source):
        source.require_labels(split, why)


def has_labels(source: sources.DataSource, split: str) -> bool:
    """Whether ``split`` is labeled (always, except an image folder's missing or unlabeled splits)."""
    if not is_folder(source):
        return True
    try:
        source.require_labels(split, "")
    except ValueError:
        return False
    return True


def host_size(config: ml_collections.ConfigDict) -> int:
    """The square side images are stored at for augmentation on the device (streamed data, folders):
    ``image_size / CROP_PROPORTION`` above 32 px, where the evaluation view is a centre crop, else
    ``image_size``."""
    if config.image_size <= SMALL_IMAGE_SIZE:
        return config.image_size
    return round(config.image_size * _HOST_RESIZE_FACTOR)


def tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def augments_on_device(config: ml_collections.ConfigDict, source: sources.DataSource) -> bool:
    """Whether this stage augments on the device (see the module docstring for the automatic choice)."""
    choice = config.get("augment_on_device")
    has_tf = tensorflow_available()
    if choice is None:
        return jax.default_backend() != "cpu" or not has_tf or source.in_memory
    if not choice and not has_tf:
        raise ValueError(
            "config.augment_on_device=False augments with TensorFlow, which is not installed here. "
            "Set --config.augment_on_device=True (or leave it unset) or install tensorflow-cpu."
        )
    if not source.in_memory and not is_folder(source) and not has_tf:
        raise ValueError(f"Data set {source.name!r} is streamed from tfds files, which needs TensorFlow.")
    return bool(choice)


def labeled_data(config: ml_collections.ConfigDict, source: sources.DataSource):
    """The labeled training set a config asks for: ``(source, split, indices or None, count)``.

    ImageNet at 1% / 10% uses the official image lists (tfds ``imagenet2012_subset``); any other
    data set takes a class-balanced subset by ``label_seed``: ``examples_per_class`` if set, else
    ``label_fraction`` (1.0 = every label).
    """
    require_labels(source, config.train_split, "Training on labels")
    if config.get("label_list"):
        indices = listed_indices(config.label_list, source, config.train_split)
        return source, config.train_split, indices, len(indices)
    per_class = config.get("examples_per_class", 0)
    fraction = config.get("label_fraction", 1.0)
    official = None if per_class else subsets.labeled_split(config.dataset, fraction)
    if official is not None:
        name, split = official
        subset = sources.get_source(name, config.data_dir or None)
        return subset, split, None, subset.num_examples(split)
    if not per_class and fraction >= 1.0:
        return source, config.train_split, None, source.num_examples(config.train_split)
    indices = subsets.label_fraction_subset(
        source.labels(config.train_split),
        num_classes=source.num_classes,
        fraction=None if per_class else fraction,
        per_class=per_class or None,
        seed=config.label_seed,
    )
    return source, config.train_split, indices, len(indices)


def listed_indices(path: str, source: sources.DataSource, split: str):
    """The indices of the images a label list names (one path per line, relative to the split's
    folder; blank lines and ``#`` comments skipped); one error naming the file and what is missing."""
    import numpy as np

    if not is_folder(source):
        raise ValueError("config.label_list names images by path: it works with dataset='image_folder'.")
    try:
        with open(path) as f:
            wanted = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    except OSError as e:
        raise FileNotFoundError(f"config.label_list={path!r} does not read ({e.strerror or e}).") from None
    position = {p: i for i, p in enumerate(source.relative_paths(split))}
    missing = [p for p in wanted if p not in position]
    if missing:
        raise ValueError(
            f"config.label_list={path!r} names {len(missing)} image(s) that split {split!r} does not hold, "
            f"e.g. {', '.join(missing[:3])}: paths are relative to the split's folder, one per line."
        )
    if not wanted:
        raise ValueError(f"config.label_list={path!r} names no images.")
    return np.unique(np.asarray([position[p] for p in wanted], np.int64))


def _host_preprocess(config: ml_collections.ConfigDict, *, contrastive: bool, on_device: bool):
    """The tf.data per-view function: crop, flip and colour (blur runs in the step in any case), or,
    with the augmentations on the device, only a resize to a fixed size."""
    from simclrv2_jax.data import augment

    if on_device:
        size = host_size(config)
        return lambda image, seed: augment.resize(image, size, size)
    return functools.partial(
        augment.preprocess_for_train,
        height=config.image_size,
        width=config.image_size,
        color_jitter_strength=config.get("color_jitter_strength", 0.0),
        use_blur=False,
        color_distort=contrastive,
        crop_min_area=config.get("crop_min_area", CROP_AREA_RANGE[0]),
    )


@dataclasses.dataclass
class StageInput:
    """A stage's input: host streams, and what the step does to them on the device.

    ``on_device`` is ``augments_on_device(config, source)``. The Gaussian blur of pretraining runs in
    the step whichever side does the rest, as in the release (its blur is a batch op in the model).
    """

    config: ml_collections.ConfigDict
    source: sources.DataSource
    mesh: Mesh
    on_device: bool = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.on_device = augments_on_device(self.config, self.source)

    def train_data(
        self,
        *,
        num_views: int,
        contrastive: bool,
        source: sources.DataSource | None = None,
        split: str | None = None,
        indices=None,
        seed: int | None = None,
    ) -> Callable[[int], Iterable]:
        """``make(start_step)``: this process's training batches from ``start_step`` on.

        Host augmentation gives ``num_views`` views per image; device augmentation gives the stored
        (streamed: resized) images once, and the step makes the views.
        """
        config, on_device = self.config, self.on_device
        source = source or self.source
        seed = config.seed if seed is None else seed
        parallel.local_batch_size(config.train_batch_size, self.mesh)
        shards = parallel.input_shards(config)
        per_shard = config.train_batch_size // shards
        mine = parallel.process_input_shards(shards)
        split = split or config.train_split

        def one_shard(index: int, start_step: int) -> Iterable:
            shard = dict(process_index=index, process_count=shards, indices=indices)
            common = dict(local_batch_size=per_shard, seed=seed, start_step=start_step, **shard)
            if on_device and source.in_memory:
                return array_pipeline.train_batches(source, split, **common)
            if on_device and is_folder(source):
                return folder_pipeline.train_batches(source, split, size=host_size(config), **common)
            from simclrv2_jax.data import pipeline

            size = host_size(config) if on_device else config.image_size
            return pipeline.train_dataset(
                source,
                split,
                local_batch_size=per_shard,
                seed=seed,
                start_step=start_step,
                num_views=1 if on_device else num_views,
                image_size=size,
                preprocess=_host_preprocess(config, contrastive=contrastive, on_device=on_device),
                **shard,
            )

        def make(start_step: int) -> Iterable:
            streams = [one_shard(index, start_step) for index in mine]
            return streams[0] if len(streams) == 1 else array_pipeline.concatenated(streams)

        return make

    def eval_data(self, split: str | None = None, indices=None) -> Callable[[], Iterable]:
        """``make()``: one evaluation-style pass (centre view, padded full batches) over this
        process's share of ``split`` (default ``eval_split``), or of its positions ``indices``."""
        config, source = self.config, self.source
        split = split or config.eval_split
        local = parallel.local_batch_size(config.eval_batch_size, self.mesh, field="eval_batch_size")
        shard = dict(process_index=jax.process_index(), process_count=jax.process_count(), indices=indices)

        def make() -> Iterable:
            if self.on_device and source.in_memory:
                return array_pipeline.eval_batches(source, split, local_batch_size=local, **shard)
            if self.on_device and is_folder(source):
                size = host_size(config)
                return folder_pipeline.eval_batches(source, split, local_batch_size=local, size=size, **shard)
            from simclrv2_jax.data import pipeline

            return pipeline.eval_dataset(
                source, split, local_batch_size=local, image_size=config.image_size, **shard
            )

        return make

    def train_augment(
        self, *, num_views: int, contrastive: bool, keys: tuple[str, ...] = ("image",)
    ) -> Callable[[dict, jax.Array], dict] | None:
        """``augment(batch, key) -> batch`` run in the step, or None when there is nothing to do there.

        On the device: each batch entry named in ``keys`` becomes ``[B, H, W, C]`` views (or
        ``[B, num_views, H, W, C]``), the layout the host pipeline delivers; each entry and view has
        its own random numbers. On the host: only pretraining's blur, on the views the host made.
        """
        config = self.config
        use_blur = contrastive and config.get("use_blur", False)
        if not self.on_device and not use_blur:
            return None
        size = config.image_size
        if self.on_device:
            view = functools.partial(
                device_augment.preprocess_for_train,
                height=size,
                width=size,
                color_jitter_strength=config.get("color_jitter_strength", 0.0),
                use_blur=use_blur,
                color_distort=contrastive,
                crop_min_area=config.get("crop_min_area", CROP_AREA_RANGE[0]),
            )
        else:

            def view(images, key):
                return device_augment.random_blur(images, key, size)

        def augment(batch: dict, key: jax.Array) -> dict:
            out = dict(batch)
            for i, name in enumerate(keys):
                view_keys = jax.random.split(jax.random.fold_in(key, i), num_views)
                if self.on_device:
                    views = [view(batch[name], k) for k in view_keys]
                else:
                    views = [batch[name]] if num_views == 1 else [batch[name][:, v] for v in range(num_views)]
                    views = [view(x, k) for x, k in zip(views, view_keys)]
                out[name] = views[0] if num_views == 1 else jnp.stack(views, axis=1)
            return out

        return augment

    def eval_preprocess(self) -> Callable[[jax.Array], jax.Array] | None:
        """The evaluation view made on the device (stored in-memory images), else None (the host)."""
        if not (self.on_device and (self.source.in_memory or is_folder(self.source))):
            return None
        size = self.config.image_size
        return functools.partial(device_augment.preprocess_for_eval, height=size, width=size)


def with_labeled(unlabeled: Iterable, labeled: Iterable | None) -> Iterator[dict[str, Any]]:
    """Distillation's batches: the unlabeled images (their labels dropped: only ``image`` and ``mask``
    go on), each joined with a labeled batch as ``labeled_image`` / ``labeled_label`` if given."""
    if labeled is not None:
        labeled = array_pipeline.numpy_batches(labeled)
    for batch in array_pipeline.numpy_batches(unlabeled):
        out = {"image": batch["image"], "mask": batch["mask"]}
        if labeled is not None:
            extra = next(labeled)
            out["labeled_image"], out["labeled_label"] = extra["image"], extra["label"]
        yield out
