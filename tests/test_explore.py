"""The notebook's tools: Fashion-MNIST stored as IDX files, a model's outputs in batches, cosine
nearest neighbours, k-NN votes, top-5 classes, the time-limited path check, and the figures."""

import json
import time

import numpy as np
import pytest
from conftest import read_idx_gz

from simclrv2_jax.data import fetch, sources
from simclrv2_jax.evaluation import explore, plots


def _fake_splits(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "train": (
            rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, 30).astype(np.uint8),
        ),
        "test": (
            rng.integers(0, 256, (10, 28, 28, 1), dtype=np.uint8),
            rng.integers(0, 10, 10).astype(np.uint8),
        ),
    }


def test_fashion_mnist_written_as_idx_files_reads_back(tmp_path):
    splits = _fake_splits()
    assert not fetch.has_fashion_mnist(tmp_path) and not fetch.has_fashion_mnist(None)
    fetch.write_fashion_mnist(tmp_path, splits)
    assert fetch.has_fashion_mnist(tmp_path)
    for split, (image_file, label_file) in sources.FASHION_MNIST_FILES.items():
        images, labels = splits[split]
        # Read with the format's own description (conftest.read_idx_gz), not the package's reader.
        np.testing.assert_array_equal(read_idx_gz(tmp_path / image_file), images.reshape(-1, 28, 28))
        np.testing.assert_array_equal(read_idx_gz(tmp_path / label_file), labels)
    source = sources.get_source("fashion_mnist", str(tmp_path))
    images, labels = source.arrays("test")
    assert images.shape == (10, 28, 28, 3) and np.array_equal(labels, splits["test"][1])


def test_idx_writer_refuses_what_it_cannot_store(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        fetch.write_idx(tmp_path / "x.gz", np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="splits"):
        fetch.write_fashion_mnist(tmp_path, {"train": _fake_splits()["train"]})


def test_download_through_tfds_writes_the_four_files(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    # tfds's own mock: random examples of the data set's features, no network.
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        directory = fetch.download_fashion_mnist(tmp_path / "fm")
    assert fetch.has_fashion_mnist(directory)
    assert read_idx_gz(tmp_path / "fm" / "train-images-idx3-ubyte.gz").shape == (6, 28, 28)
    assert read_idx_gz(tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz").shape == (6,)


def test_model_inputs_are_the_evaluation_view():
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    same = explore.model_inputs(images, 28)  # <= 32 px: no crop, and no resize at the same size
    np.testing.assert_allclose(same, np.repeat(images[..., None], 3, -1) / 255.0, atol=1e-6)
    assert same.dtype == np.float32
    small = explore.model_inputs(images, 16)
    assert small.shape == (3, 16, 16, 3) and 0.0 <= small.min() and small.max() <= 1.0


class _MeanModel:
    """Stands in for SimCLRModel: ``final_avg_pool`` = per-channel mean times a weight."""

    def apply(self, variables, images, train):
        assert train is False
        return {"final_avg_pool": images.mean(axis=(1, 2)) * variables["w"]}


def test_infer_runs_every_image_in_padded_batches():
    images = np.random.default_rng(1).random((7, 4, 4, 3)).astype(np.float32)
    variables = {"w": np.float32(2.0)}
    out = explore.infer(_MeanModel(), variables, images, batch_size=3)
    np.testing.assert_allclose(out, 2.0 * images.mean(axis=(1, 2)), rtol=1e-6)
    raw = (images[..., 0] * 255).astype(np.uint8)  # gray uint8, made into the view in the program
    out = explore.infer(_MeanModel(), variables, raw, image_size=4, batch_size=5)
    expected = 2.0 * np.repeat(raw[..., None] / 255.0, 3, -1).mean(axis=(1, 2))
    np.testing.assert_allclose(out, expected, rtol=1e-5)


def test_nearest_neighbours_by_cosine_similarity():
    rng = np.random.default_rng(2)
    keys, queries = rng.normal(size=(50, 8)), rng.normal(size=(9, 8))
    indices, sims = explore.nearest_neighbours(queries, keys * rng.uniform(0.1, 10, (50, 1)), k=4, chunk=4)
    cosine = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        keys / np.linalg.norm(keys, axis=1, keepdims=True)
    ).T  # the scaling of a key does not change its cosine
    np.testing.assert_array_equal(indices, np.argsort(-cosine, axis=1)[:, :4])
    np.testing.assert_allclose(sims, np.sort(cosine, axis=1)[:, ::-1][:, :4], rtol=1e-5)
    with pytest.raises(ValueError, match="k=51"):
        explore.nearest_neighbours(queries, keys, k=51)


def test_knn_majority_vote_and_ties():
    # Training points on the unit circle at 0, 10, 20, 30 and 40 degrees; the query at 0 degrees has
    # them in that order of similarity.
    angles = np.radians([0.0, 10.0, 20.0, 30.0, 40.0])
    train = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    query = np.array([[1.0, 0.0]])
    labels = np.array([1, 2, 2, 3, 3])
    assert explore.knn_predict(train, labels, query, k=1).tolist() == [1]
    assert explore.knn_predict(train, labels, query, k=3).tolist() == [2]  # 2 votes against 1
    assert explore.knn_predict(train, np.array([3, 1, 1, 3, 0]), query, k=4).tolist() == [3]  # 2-2: nearer
    accuracy = explore.knn_accuracy(train, labels, np.concatenate([query, query]), np.array([2, 1]), k=3)
    assert accuracy == 0.5


def test_top_k_classes_and_probabilities():
    classes, probs = explore.top_k(np.array([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0]]), k=2)
    assert classes.tolist() == [[1, 2], [2, 0]]
    total = np.exp(1.0) + np.exp(3.0) + np.exp(2.0)
    np.testing.assert_allclose(probs[0], [np.exp(3.0) / total, np.exp(2.0) / total])


def test_path_readable_answers_in_time(tmp_path):
    (tmp_path / "here").write_text("x")
    assert explore.path_readable(str(tmp_path / "here"))
    assert not explore.path_readable(str(tmp_path / "absent"))

    def raises(path):
        raise OSError("no credentials")

    assert not explore.path_readable("gs://bucket/x", exists=raises)
    start = time.monotonic()
    assert not explore.path_readable("gs://bucket/x", timeout_s=0.2, exists=lambda p: time.sleep(5) or True)
    assert time.monotonic() - start < 2.0


def test_figures_leave_the_matplotlib_backend_alone(tmp_path):
    import matplotlib

    previous = matplotlib.get_backend()
    matplotlib.use("pdf")  # any backend but Agg: plot_summary used to switch to Agg
    try:
        for stage in ("pretrain", "finetune"):
            (tmp_path / stage).mkdir()
            rows = [
                {"step": 1, "train/contrast_loss": 6.0, "train/sup_loss": 2.0},
                {"step": 1, "eval/top1": 0.5},
            ]
            (tmp_path / stage / "history.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        summary = {"stages": {s: {"eval": {"top1": 0.5}} for s in ("pretrain", "finetune")}, "labels": "x"}
        plots.plot_summary(str(tmp_path), ["pretrain", "finetune"], summary, str(tmp_path / "summary.png"))
        assert (tmp_path / "summary.png").read_bytes().startswith(b"\x89PNG")
        views = plots.views_figure(
            np.zeros((4, 28, 28), np.uint8), [np.ones((4, 16, 16, 3))] * 2, list("abcd")
        )
        assert len(views.axes) == 3 * 4
        neighbours = plots.neighbours_figure(
            np.zeros((2, 28, 28, 3), np.uint8), ["q", "r"], np.zeros((2, 3, 28, 28, 3)), [list("abc")] * 2
        )
        assert len(neighbours.axes) == 2 * 4
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(previous)
