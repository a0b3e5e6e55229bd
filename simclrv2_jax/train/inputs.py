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

from simclrv2_jax.data import array_pipeline, device_augment, sources, subsets
from simclrv2_jax.data.views import CROP_PROPORTION
from simclrv2_jax.train import parallel

# Streamed images are resized to image_size / CROP_PROPORTION on the host before the device crops them,
# the size from which the release's evaluation takes its centre crop.
_HOST_RESIZE_FACTOR = 1 / CROP_PROPORTION


def load_source(config: ml_collections.ConfigDict) -> sources.DataSource:
    return sources.get_source(config.dataset, config.data_dir or None)


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
    if not source.in_memory and not has_tf:
        raise ValueError(f"Data set {source.name!r} is streamed from tfds files, which needs TensorFlow.")
    return bool(choice)


def labeled_data(config: ml_collections.ConfigDict, source: sources.DataSource):
    """The labeled training set a config asks for: ``(source, split, indices or None, count)``.

    ImageNet at 1% / 10% uses the official image lists (tfds ``imagenet2012_subset``); any other
    data set takes a class-balanced subset by ``label_seed``: ``examples_per_class`` if set, else
    ``label_fraction`` (1.0 = every label).
    """
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


def _host_preprocess(config: ml_collections.ConfigDict, *, contrastive: bool, on_device: bool):
    """The tf.data per-view function: crop, flip and colour (blur runs in the step in any case), or,
    with the augmentations on the device, only a resize to a fixed size."""
    from simclrv2_jax.data import augment

    if on_device:
        size = round(config.image_size * _HOST_RESIZE_FACTOR)
        return lambda image, seed: augment.resize(image, size, size)
    return functools.partial(
        augment.preprocess_for_train,
        height=config.image_size,
        width=config.image_size,
        color_jitter_strength=config.get("color_jitter_strength", 0.0),
        use_blur=False,
        color_distort=contrastive,
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
            if on_device and source.in_memory:
                return array_pipeline.train_batches(
                    source, split, local_batch_size=per_shard, seed=seed, start_step=start_step, **shard
                )
            from simclrv2_jax.data import pipeline

            size = round(config.image_size * _HOST_RESIZE_FACTOR) if on_device else config.image_size
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

    def eval_data(self) -> Callable[[], Iterable]:
        config, source = self.config, self.source
        local = parallel.local_batch_size(config.eval_batch_size, self.mesh, field="eval_batch_size")
        shard = dict(process_index=jax.process_index(), process_count=jax.process_count())

        def make() -> Iterable:
            if self.on_device and source.in_memory:
                return array_pipeline.eval_batches(source, config.eval_split, local_batch_size=local, **shard)
            from simclrv2_jax.data import pipeline

            return pipeline.eval_dataset(
                source, config.eval_split, local_batch_size=local, image_size=config.image_size, **shard
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
        if not (self.on_device and self.source.in_memory):
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
