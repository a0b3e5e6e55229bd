"""A trained or converted model at work, outside the training loop (the Colab notebook's tools).

* ``model_inputs``: images as the model sees them at evaluation (``device_augment.preprocess_for_eval``:
  float32 in [0, 1], three channels, the 87.5% centre crop above 32 px, bicubic resize).
* ``infer``: one of the model's named outputs (``final_avg_pool`` = the representation h,
  ``logits_sup``, ...) in inference mode, in fixed-size batches, so one program serves any count;
  raw images are turned into the evaluation view in the same program.
* ``nearest_neighbours`` and ``knn_accuracy``: cosine similarity of representations; the k-NN
  classifier takes the majority label of the k most similar training examples.
* ``top_k``: the most likely classes of logits, with their softmax probabilities.
* ``path_readable``: whether a (possibly remote, ``gs://``) path can be read, given a time limit, so
  that a notebook can fall back to local files instead of hanging without network.

Models are those of ``SavedRun(workdir).load_model()`` (a run's checkpoint) or
``checkpoints.release.load_official`` (a published checkpoint):
``model.apply(variables, images, train=False)``. ``explore_run`` is ``python -m simclrv2_jax.explore``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from simclrv2_jax.checkpoints.release_read import path_readable  # noqa: F401  (the notebook's)
from simclrv2_jax.data import device_augment


def _three_channels(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def model_inputs(images: np.ndarray, image_size: int) -> np.ndarray:
    """Images (uint8 ``[N, H, W]`` or ``[N, H, W, C]``, or float in [0, 1]) as the evaluation view:
    float32 ``[N, image_size, image_size, 3]`` in [0, 1]; one channel is tiled to three."""
    out = device_augment.preprocess_for_eval(_three_channels(images), height=image_size, width=image_size)
    return np.asarray(out, np.float32)


def infer(
    model: Any,
    variables: Any,
    images: np.ndarray,
    output: str = "final_avg_pool",
    *,
    image_size: int | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """``model.apply(variables, images, train=False)[output]`` over all images, ``batch_size`` at a time.

    ``images`` are the model's inputs (float32 in [0, 1]) or, with ``image_size``, raw images that
    each batch turns into the evaluation view first (``model_inputs``, inside the compiled program).
    The last batch is padded, so that every batch runs the one compiled program; batch norm in
    inference mode makes each row independent of the others.
    """
    images = _three_channels(images) if image_size else np.asarray(images, np.float32)
    batch_size = max(1, min(batch_size, len(images)))

    def apply(v, x):
        if image_size:
            x = device_augment.preprocess_for_eval(x, height=image_size, width=image_size)
        return model.apply(v, x, train=False)[output]

    apply = jax.jit(apply)
    parts = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        real = len(batch)
        if real < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - real, *batch.shape[1:]), batch.dtype)])
        parts.append(np.asarray(apply(variables, batch))[:real])
    return np.concatenate(parts)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest_neighbours(
    queries: np.ndarray, keys: np.ndarray, k: int, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, similarities)``, each ``[Q, k]``: the ``k`` keys most cosine-similar to each query,
    most similar first. Queries are taken ``chunk`` at a time, so memory stays ``chunk x len(keys)``."""
    if not 1 <= k <= len(keys):
        raise ValueError(f"k={k} must be between 1 and the number of keys ({len(keys)}).")
    keys = _unit_rows(keys)
    indices, similarities = [], []
    for start in range(0, len(queries), chunk):
        sims = _unit_rows(queries[start : start + chunk]) @ keys.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        indices.append(top)
        similarities.append(np.take_along_axis(sims, top, axis=1))
    return np.concatenate(indices), np.concatenate(similarities)


def knn_predict(
    train_embeddings: np.ndarray, train_labels: np.ndarray, test_embeddings: np.ndarray, k: int
) -> np.ndarray:
    """The majority label of each test example's ``k`` most cosine-similar training examples; a tie
    goes to the tied label of the most similar neighbour."""
    indices, _ = nearest_neighbours(test_embeddings, train_embeddings, k)
    labels = np.asarray(train_labels)[indices]  # [N, k], nearest first
    votes = (labels[:, :, None] == labels[:, None, :]).sum(axis=-1)  # votes for neighbour j's label
    first_winner = np.argmax(votes == votes.max(axis=1, keepdims=True), axis=1)
    return labels[np.arange(len(labels)), first_winner]


def knn_accuracy(
    train_embeddings: np.ndarray,
    train_labels: np.ndarray,
    test_embeddings: np.ndarray,
    test_labels: np.ndarray,
    k: int,
) -> float:
    """Top-1 accuracy of ``knn_predict`` on the test examples."""
    predictions = knn_predict(train_embeddings, train_labels, test_embeddings, k)
    return float(np.mean(predictions == np.asarray(test_labels)))


def top_k(logits: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """``(classes, probabilities)``, each ``[N, k]``: the ``k`` largest logits' classes, most likely
    first, and their softmax probabilities."""
    logits = np.asarray(logits, np.float64)
    classes = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=-1, keepdims=True)
    return classes, np.take_along_axis(probabilities, classes, axis=-1)


def split_images(source, split: str, count: int, image_size: int, seed: int | None = None):
    """``(images, labels, raw)``: ``count`` images of a split (0: all) and their labels. In-memory data
    gives the stored images (``raw`` True: ``infer`` makes the evaluation view with ``image_size``);
    streamed data gives evaluation views made by the tf.data evaluation pipeline (``raw`` False).
    ``seed`` draws the images at random (without replacement), else the split's first ones are taken."""
    total = source.num_examples(split)
    count = total if count <= 0 else min(count, total)
    if source.in_memory:
        images, labels = source.arrays(split)
        order = np.arange(total) if seed is None else np.random.default_rng(seed).permutation(total)
        chosen = np.sort(order[:count]) if seed is not None else order[:count]
        return images[chosen], np.asarray(labels)[chosen], True
    from simclrv2_jax.data import pipeline

    batches = pipeline.eval_dataset(source, split, local_batch_size=min(count, 256), image_size=image_size)
    images, labels = [], []
    for batch in batches.as_numpy_iterator():
        real = batch["mask"] > 0
        images.append(batch["image"][real])
        labels.append(batch["label"][real])
        if sum(len(x) for x in labels) >= count:
            break
    return np.concatenate(images)[:count], np.concatenate(labels)[:count], False


def explore_run(
    workdir: str,
    *,
    step: int | None = None,
    overrides: dict[str, Any] | None = None,
    num_images: int = 8,
    neighbours: int = 5,
    knn_k: int = 20,
    bank_size: int = 10000,
) -> str:
    """The report ``python -m simclrv2_jax.explore`` prints (see that command's docstring)."""
    from simclrv2_jax.checkpoints import SavedRun
    from simclrv2_jax.evaluation.evaluator import evaluation_config
    from simclrv2_jax.train import inputs

    run = SavedRun(workdir, "--workdir")
    step = run.resolve(step)
    config = evaluation_config(run.saved_config(step), overrides or {})
    loaded = run.load_model(step)
    source = inputs.load_source(config)
    size = config.image_size
    names = source.class_names or ()

    def name(label: int) -> str:
        return names[label] if 0 <= label < len(names) else str(label)

    bank, bank_labels, bank_raw = split_images(source, config.train_split, bank_size, size, seed=0)
    evals, eval_labels, eval_raw = split_images(source, config.eval_split, 0, size)
    if not len(bank) or not len(evals):
        raise ValueError(f"The data set {config.dataset!r} gave no images for the bank or the evaluation.")

    def embed(images, raw, output="final_avg_pool"):
        return infer(loaded.model, loaded.variables, images, output, image_size=size if raw else None)

    bank_h = embed(bank, bank_raw)
    eval_h = embed(evals, eval_raw)
    k = max(1, min(knn_k, len(bank)))
    accuracy = knn_accuracy(bank_h, bank_labels, eval_h, eval_labels, k)
    shown = min(num_images, len(evals))
    nearest, similarity = nearest_neighbours(eval_h[:shown], bank_h, max(1, min(neighbours, len(bank))))
    logits = None
    if "head_supervised" in run.modules(step):
        logits = embed(evals[:shown], eval_raw, "logits_sup")
    lines = [
        f"{workdir} step {step} ({config.stage}, head mode {loaded.head_mode}) on "
        f"{config.dataset}/{config.eval_split}:"
    ]
    for i in range(shown):
        lines.append(f"  image {i}: class {name(int(eval_labels[i]))}")
        if logits is not None:
            classes, probabilities = top_k(logits[i : i + 1], min(5, logits.shape[-1]))
            top = ", ".join(f"{name(int(c))} {p:.2f}" for c, p in zip(classes[0], probabilities[0]))
            lines.append(f"    top-5: {top}")
        near = ", ".join(f"{name(int(bank_labels[j]))} ({s:.2f})" for j, s in zip(nearest[i], similarity[i]))
        lines.append(f"    nearest training images (cosine similarity of h): {near}")
    lines.append(
        f"k-NN accuracy of h (k={k}, a bank of {len(bank)} training images, {len(evals)} evaluation "
        f"images): {accuracy:.4f}"
    )
    return "\n".join(lines)
