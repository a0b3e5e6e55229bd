"""The k-NN monitor: how good a representation is, without training anything on it.

The protocol of InstDisc, lightly and solo-learn: the representation ``h`` (``final_avg_pool``) of each
image, in inference mode, L2-normalised; the bank is the training split with its labels
(``knn_bank_size`` > 0 draws that many at random, fixed by ``seed``, for ImageNet-size data); each
evaluation image's ``knn_k`` most cosine-similar bank rows vote for their labels with weight
``exp(similarity / knn_temperature)``, and the class with the largest vote is the prediction (a tie
goes to the lower class index). ``knn_top1`` is the fraction of evaluation images predicted right.

Everything runs on the devices: the bank is an array split over the ``data`` axis, a chunk of
queries is compared with it by one matmul, and ``lax.top_k`` takes each query's neighbours
(``knn_vote``). The cost of one evaluation is a forward pass over the bank and the evaluation split
plus ``num_eval x bank_size x d`` multiply-adds.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from simclrv2_jax.data.array_pipeline import global_iterator
from simclrv2_jax.train import inputs, parallel
from simclrv2_jax.train.evaluation import EvalInterrupted

QUERY_CHUNK = 1024


def normalized(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_vote(
    bank: jax.Array,
    bank_labels: jax.Array,
    queries: jax.Array,
    *,
    k: int,
    temperature: float,
    num_classes: int,
) -> jax.Array:
    """``[Q, num_classes]`` weighted votes of each query's ``k`` most cosine-similar bank rows
    (all inputs unnormalised features; ``bank_labels`` int, -1 rows never vote)."""
    similarity = normalized(queries) @ normalized(bank).T  # [Q, M]
    similarity = jnp.where(bank_labels[None, :] >= 0, similarity, -jnp.inf)
    top, index = jax.lax.top_k(similarity, k)
    weights = jnp.where(jnp.isfinite(top), jnp.exp(top / temperature), 0.0)
    labels = jnp.take(bank_labels, index)
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return jnp.einsum("qk,qkc->qc", weights, one_hot)


def knn_predictions(
    bank: np.ndarray | jax.Array,
    bank_labels: np.ndarray,
    queries: np.ndarray | jax.Array,
    *,
    k: int,
    temperature: float,
    num_classes: int,
    mesh=None,
) -> np.ndarray:
    """Each query's predicted class (``knn_vote``'s arg-max), the bank split over the mesh's devices,
    the queries taken ``QUERY_CHUNK`` at a time."""
    mesh = mesh or parallel.create_mesh()
    devices = mesh.devices.size
    bank = np.asarray(bank, np.float32)
    labels = np.asarray(bank_labels, np.int32)
    pad = (-len(bank)) % devices  # rows that never vote, so the bank splits evenly
    if pad:
        bank = np.concatenate([bank, np.zeros((pad, bank.shape[1]), np.float32)])
        labels = np.concatenate([labels, np.full(pad, -1, np.int32)])
    k = max(1, min(k, len(bank_labels)))
    split = parallel.data_sharding(mesh)
    bank_d, labels_d = jax.device_put(bank, split), jax.device_put(labels, split)
    vote = jax.jit(
        lambda b, lab, q: jnp.argmax(
            knn_vote(b, lab, q, k=k, temperature=temperature, num_classes=num_classes), axis=-1
        ),
        out_shardings=parallel.replicated(mesh),
    )
    queries = np.asarray(queries, np.float32)
    out = []
    for start in range(0, len(queries), QUERY_CHUNK):
        chunk = queries[start : start + QUERY_CHUNK]
        real = len(chunk)
        if real < QUERY_CHUNK and len(queries) > QUERY_CHUNK:  # one program for every chunk
            chunk = np.concatenate([chunk, np.zeros((QUERY_CHUNK - real, chunk.shape[1]), np.float32)])
        chunk = jax.device_put(chunk, parallel.replicated(mesh))  # the same queries on every process
        out.append(np.asarray(vote(bank_d, labels_d, chunk))[:real])
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def knn_accuracy(bank, bank_labels, queries, query_labels, **kwargs) -> float:
    """Top-1 of ``knn_predictions`` against ``query_labels``."""
    predictions = knn_predictions(bank, bank_labels, queries, **kwargs)
    return float(np.mean(predictions == np.asarray(query_labels)))


@dataclasses.dataclass
class Features:
    """Features and labels of one pass over a split (the padding rows dropped)."""

    features: np.ndarray
    labels: np.ndarray


def extract(batches: Iterable, embed: Callable, variables: Any, sharding) -> Features:
    """``embed(variables, batch) -> {"h", "label", "mask"}`` over eval-style batches, the outputs
    replicated (every process gets the whole batch's rows); padding rows (``mask`` 0) dropped."""
    features, labels = [], []
    for batch in global_iterator(batches, sharding):
        out = jax.device_get(embed(variables, batch))
        keep = np.asarray(out["mask"]) > 0
        features.append(np.asarray(out["h"])[keep])
        labels.append(np.asarray(out["label"])[keep])
    if not features:
        return Features(np.zeros((0, 0), np.float32), np.zeros(0, np.int64))
    return Features(np.concatenate(features), np.concatenate(labels))


def extract_features(
    batches: Iterable,
    embed: Callable,
    variables: Any,
    sharding,
    should_stop: Callable[[], bool] | None = None,
) -> Features:
    """``extract`` raising ``EvalInterrupted`` between batches when ``should_stop()`` is true."""
    if should_stop is None:
        return extract(batches, embed, variables, sharding)

    def checked():
        for batch in batches:
            if should_stop():
                raise EvalInterrupted
            yield batch

    return extract(checked(), embed, variables, sharding)


class KnnMonitor:
    """``knn_top1`` of a network's ``h`` (``proj_head_input``, inference mode) for a data set: the bank
    is the training split (``knn_bank_size`` of it at random, by ``seed``), the queries its evaluation
    split (``pixels``: the evaluation view's pixels instead of ``h``). ``monitor(params, batch_stats)``
    gives ``{"knn_top1"}`` (its time in ``last_time_s``); ``gather`` (fsdp's ``ParamLayout.gather``)
    puts sharded parameters together inside the jitted forward pass."""

    def __init__(
        self, config, model, source, mesh, *, gather: Callable | None = None, pixels: bool = False
    ) -> None:
        self.settings = KnnSettings.of(config)
        self.mesh = mesh
        self.num_classes = int(config.num_classes or source.num_classes)
        data = inputs.StageInput(config, source, mesh)
        chosen = bank_indices(source.num_examples(config.train_split), self.settings.bank_size, config.seed)
        self.bank_data = data.eval_data(config.train_split, indices=chosen)
        self.query_data = data.eval_data()
        self.num_queries = 0
        self.last_time_s = 0.0  # the last measurement's seconds (results.json: knn_time_s)
        self.bank_size = len(chosen) if chosen is not None else source.num_examples(config.train_split)
        preprocess = data.eval_preprocess()

        def embed(variables, batch):
            images = batch["image"] if preprocess is None else preprocess(batch["image"])
            params = gather(variables["params"]) if gather is not None else variables["params"]
            out = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]}, images, train=False
            )
            h = out["proj_head_input"].astype(jnp.float32)
            if pixels:  # the reference line: the evaluation view itself, flattened
                h = images.reshape(images.shape[0], -1).astype(jnp.float32)
            return {"h": h, "label": batch["label"], "mask": batch["mask"]}

        self.embed = jax.jit(embed, out_shardings=parallel.replicated(mesh))
        self.sharding = parallel.data_sharding(mesh)

    def __call__(
        self, params, batch_stats, should_stop: Callable[[], bool] | None = None
    ) -> dict[str, float]:
        t0 = time.time()
        variables = {"params": params, "batch_stats": batch_stats}
        bank = extract_features(self.bank_data(), self.embed, variables, self.sharding, should_stop)
        queries = extract_features(self.query_data(), self.embed, variables, self.sharding, should_stop)
        self.num_queries = len(queries.labels)
        top1 = knn_accuracy(
            bank.features,
            bank.labels,
            queries.features,
            queries.labels,
            k=self.settings.k,
            temperature=self.settings.temperature,
            num_classes=self.num_classes,
            mesh=self.mesh,
        )
        self.last_time_s = time.time() - t0
        logging.info(
            "k-NN of h: top-1 %.4f (bank %d, %d queries, k %d) in %.1f s",
            top1,
            len(bank.labels),
            self.num_queries,
            self.settings.k,
            self.last_time_s,
        )
        return {"knn_top1": top1}


@dataclasses.dataclass
class KnnSettings:
    k: int = 200
    temperature: float = 0.1
    bank_size: int = 0  # 0: the whole training split

    @classmethod
    def of(cls, config) -> KnnSettings:
        return cls(
            int(config.get("knn_k", 200)),
            float(config.get("knn_temperature", 0.1)),
            int(config.get("knn_bank_size", 0)),
        )


def bank_indices(num_examples: int, bank_size: int, seed: int) -> np.ndarray | None:
    """The training examples in the bank: all (None), or ``bank_size`` drawn at random by ``seed``."""
    if bank_size <= 0 or bank_size >= num_examples:
        return None
    return np.sort(np.random.default_rng([seed, 0xB4CC]).choice(num_examples, bank_size, replace=False))


def reference_lines(config, source=None, mesh=None) -> dict[str, float]:
    """What a pretrained ``h`` is measured against: the same k-NN on the raw pixels (``pixels``) and on
    ``h`` of the network as initialised by ``config.seed`` before any training (``random_init``)."""
    from simclrv2_jax.train import components

    source = source or inputs.load_source(config)
    mesh = mesh or parallel.create_mesh()
    config = config.copy_and_resolve_references()
    config.num_classes = config.num_classes or source.num_classes
    model = components.build_model(config, head_mode="pretrain", num_classes=config.num_classes, mesh=mesh)
    shape = components.image_shape(config, source)
    variables = jax.jit(lambda key: model.init(key, jnp.zeros((2, *shape), jnp.float32), train=False))(
        jax.random.PRNGKey(config.seed)
    )
    out = {}
    for name, pixels in (("pixels", True), ("random_init", False)):
        monitor = KnnMonitor(config, model, source, mesh, pixels=pixels)
        out[name] = monitor(variables["params"], variables["batch_stats"])["knn_top1"]
    return out
