"""The k-NN measure of a representation against a NumPy computation written here, ties included, and
the monitor of a pretraining run against the same computation on the run's own features."""

import json
import os

import jax
import numpy as np
import pytest

from simclrv2_jax.train import knn, parallel


def numpy_knn(bank, bank_labels, queries, *, k, temperature, num_classes):
    """Cosine similarity; the k largest per query, a tie in similarity going to the lower bank row; a
    vote of exp(sim / T) per neighbour; a tie in votes going to the lower class."""
    bank = np.asarray(bank, np.float64)
    queries = np.asarray(queries, np.float64)
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    predictions = []
    for q in queries:
        similarity = bank @ q
        order = sorted(range(len(bank)), key=lambda i: (-round(similarity[i], 9), i))[:k]
        votes = np.zeros(num_classes)
        for i in order:
            votes[bank_labels[i]] += np.exp(similarity[i] / temperature)
        best = max(votes)
        predictions.append(min(c for c in range(num_classes) if np.isclose(votes[c], best, rtol=1e-9)))
    return np.array(predictions)


def test_knn_matches_numpy_with_ties_in_similarity_and_in_votes():
    # Bank rows repeated (equal similarities at the k-th place: the lower row wins) and queries half
    # way between two classes' rows (equal votes: the lower class wins).
    base = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]], np.float32)
    bank = np.concatenate([base, base, base[:3] * 2.0])  # scaled copies: the same directions
    labels = np.array([0, 1, 2, 3, 1, 2, 1, 0, 3, 2, 0, 1, 2], np.int32)  # copies differ in label
    queries = np.array(
        [[1, 1, 0], [1, 0, 0], [0, 1, 1], [1, 1, 1], [2, 1, 0], [0, 0, 3], [1, 0, 1]], np.float32
    )
    for k, temperature in ((1, 0.1), (2, 0.1), (3, 0.5), (5, 1.0), (13, 0.1)):
        expected = numpy_knn(bank, labels, queries, k=k, temperature=temperature, num_classes=4)
        got = knn.knn_predictions(bank, labels, queries, k=k, temperature=temperature, num_classes=4)
        np.testing.assert_array_equal(got, expected, err_msg=f"k={k}, T={temperature}")
    # A hand count: k=2 for [1, 1, 0] takes rows 3 and 8 (similarity 1, labels 3 and 3).
    assert knn.knn_predictions(bank, labels, queries[:1], k=2, temperature=0.1, num_classes=4)[0] == 3
    # k=1 for [1, 0, 0]: rows 0, 5 and 10 tie at similarity 1; row 0 (label 0) is taken.
    assert knn.knn_predictions(bank, labels, queries[1:2], k=1, temperature=0.1, num_classes=4)[0] == 0


def test_knn_over_eight_devices_and_query_chunks_equals_numpy(monkeypatch):
    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(203, 16)).astype(np.float32)  # not a multiple of 8: padded rows never vote
    labels = rng.integers(0, 5, 203).astype(np.int32)
    queries = rng.normal(size=(70, 16)).astype(np.float32)
    query_labels = rng.integers(0, 5, 70)
    monkeypatch.setattr(knn, "QUERY_CHUNK", 32)  # three chunks, the last one padded
    expected = numpy_knn(bank, labels, queries, k=20, temperature=0.1, num_classes=5)
    got = knn.knn_predictions(
        bank, labels, queries, k=20, temperature=0.1, num_classes=5, mesh=parallel.create_mesh()
    )
    np.testing.assert_array_equal(got, expected)
    accuracy = knn.knn_accuracy(bank, labels, queries, query_labels, k=20, temperature=0.1, num_classes=5)
    assert accuracy == pytest.approx(np.mean(expected == query_labels))


def test_a_bank_size_draws_that_many_training_examples_by_seed():
    chosen = knn.bank_indices(1000, 100, seed=3)
    assert len(chosen) == len(set(chosen.tolist())) == 100 and chosen.max() < 1000
    np.testing.assert_array_equal(chosen, knn.bank_indices(1000, 100, seed=3))
    assert not np.array_equal(chosen, knn.bank_indices(1000, 100, seed=4))
    assert knn.bank_indices(1000, 0, seed=3) is None and knn.bank_indices(1000, 5000, seed=3) is None


@pytest.mark.slow
def test_pretraining_reports_the_knn_of_its_features(pretrain_run):
    """knn_top1 in results.json and history equals NumPy's k-NN over h of the saved network (its
    evaluation views of the training and test splits, forward passes on one device)."""
    from simclrv2_jax.checkpoints import SavedRun
    from simclrv2_jax.train import inputs

    results = pretrain_run["results"]
    reported = results["eval"]["knn_top1"]
    rows = [json.loads(line) for line in open(os.path.join(pretrain_run["workdir"], "history.jsonl"))]
    assert any(row.get("eval/knn_top1") == pytest.approx(reported) for row in rows)

    config = pretrain_run["config"]
    loaded = SavedRun(str(pretrain_run["workdir"])).load_model()
    data = inputs.StageInput(config, inputs.load_source(config), parallel.create_mesh())

    def features(split, pixels=False):
        out, labels = [], []
        for batch in data.eval_data(split)():
            batch = {k: np.asarray(v) for k, v in batch.items()}
            images = batch["image"]
            if data.eval_preprocess() is not None:
                images = data.eval_preprocess()(images)
            h = loaded.model.apply(loaded.variables, images, train=False)["proj_head_input"]
            if pixels:
                h = np.asarray(images, np.float32).reshape(len(images), -1)
            keep = batch["mask"] > 0
            out.append(np.asarray(h)[keep])
            labels.append(batch["label"][keep])
        return np.concatenate(out), np.concatenate(labels)

    bank, bank_labels = features(config.train_split)
    queries, query_labels = features(config.eval_split)
    assert len(bank) == 200 and len(queries) == 40
    expected = numpy_knn(
        bank, bank_labels, queries, k=config.knn_k, temperature=config.knn_temperature, num_classes=10
    )
    # One prediction may flip on a near-tie between the sharded and the one-device forward passes.
    assert reported == pytest.approx(np.mean(expected == query_labels), abs=1.01 / len(query_labels))

    # The pipeline's reference line: the same k-NN on the raw pixels of the evaluation views.
    bank, bank_labels = features(config.train_split, pixels=True)
    queries, query_labels = features(config.eval_split, pixels=True)
    expected = numpy_knn(bank, bank_labels, queries, k=200, temperature=0.1, num_classes=10)
    lines = knn.reference_lines(config)
    assert lines["pixels"] == pytest.approx(np.mean(expected == query_labels), abs=1.01 / len(query_labels))
    assert 0.0 <= lines["random_init"] <= 1.0


@pytest.mark.slow
def test_evaluate_knn_measures_a_saved_run_as_pretraining_did(pretrain_run, tmp_path):
    from simclrv2_jax.evaluation.evaluator import RESULTS_NAME, evaluate_run

    added = evaluate_run(str(pretrain_run["workdir"]), knn=True, output_dir=str(tmp_path / "eval"))
    (entry,) = added
    reported = pretrain_run["results"]["eval"]
    assert entry["knn_top1"] == pytest.approx(reported["knn_top1"], abs=1.01 / 40)
    assert entry["top1"] == pytest.approx(reported["top1"])  # the supervised head as well
    assert (entry["knn_k"], entry["knn_temperature"], entry["knn_bank_size"]) == (200, 0.1, 200)
    saved = json.load(open(tmp_path / "eval" / RESULTS_NAME))
    assert saved["latest"]["knn_top1"] == entry["knn_top1"]
    # A bank of 50 drawn training images: what the entry says it used.
    (small,) = evaluate_run(
        str(pretrain_run["workdir"]),
        knn=True,
        overrides={"knn_bank_size": 50, "knn_k": 5},
        output_dir=str(tmp_path / "eval_small"),
    )
    assert (small["knn_k"], small["knn_bank_size"]) == (5, 50)
