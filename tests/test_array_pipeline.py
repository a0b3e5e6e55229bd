"""The TensorFlow-free input of in-memory data (augmentation on the device): epochs, shards, exact
resume and evaluation padding, checked by counting example ids, which the images carry as pixels."""

import numpy as np
import pytest

from simclrv2_jax.data import array_pipeline
from simclrv2_jax.data.sources import InMemorySource

N = 50


@pytest.fixture(scope="module")
def source():
    # Image i is filled with the value i (uint8), so every batch says which examples it holds.
    ids = np.arange(N, dtype=np.uint8)
    train = (np.broadcast_to(ids[:, None, None], (N, 2, 2)).copy(), ids % 5)
    test = (np.broadcast_to(ids[:13, None, None], (13, 2, 2)).copy(), ids[:13] % 5)
    return InMemorySource(name="ids", num_classes=5, data={"train": train, "test": test})


def ids_of(batch):
    return batch["image"][:, 0, 0, 0].astype(int)


def stream(source, batches, **kwargs):
    it = array_pipeline.train_batches(source, "train", **kwargs)
    return [next(it) for _ in range(batches)]


def test_batches_hold_uint8_images_labels_and_mask(source):
    (batch,) = stream(source, 1, local_batch_size=8, seed=0)
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (8, 2, 2, 3)
    assert batch["label"].dtype == np.int32 and np.array_equal(batch["label"], ids_of(batch) % 5)
    assert batch["mask"].dtype == np.float32 and np.all(batch["mask"] == 1)


def test_each_epoch_visits_every_example_once_in_a_new_order(source):
    # 50 examples, batch 8: the stream straddles epochs; 3 epochs = 150 elements = 18.75 batches.
    ids = np.concatenate([ids_of(b) for b in stream(source, 19, local_batch_size=8, seed=3)])
    epochs = [ids[e * N : (e + 1) * N] for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(N))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[0], np.arange(N))
    np.testing.assert_array_equal(epochs[1], array_pipeline.epoch_order(3, 1, N))


def test_resume_gives_the_batches_of_an_uninterrupted_run(source):
    straight = stream(source, 14, local_batch_size=8, seed=1)
    resumed = stream(source, 7, local_batch_size=8, seed=1, start_step=7)  # from inside epoch 1
    for a, b in zip(straight[7:], resumed):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_processes_read_disjoint_strided_shards(source):
    per_process = []
    for p in range(3):
        batches = stream(source, 17, local_batch_size=1, seed=0, process_index=p, process_count=3)
        per_process.append([int(ids_of(b)[0]) for b in batches])
    # Shard p holds the ids p, p+3, ...: 17 examples for p = 0, 1 and 16 for p = 2.
    for p, seen in enumerate(per_process):
        shard = list(range(p, N, 3))
        assert sorted(seen[: len(shard)]) == shard


def test_label_subset_indices(source):
    chosen = [3, 7, 7, 20, 41]  # duplicates are one example
    ids = np.concatenate([ids_of(b) for b in stream(source, 4, local_batch_size=2, seed=0, indices=chosen)])
    assert sorted(ids[:4]) == [3, 7, 20, 41] and sorted(ids[4:8]) == [3, 7, 20, 41]
    with pytest.raises(ValueError, match="indices"):
        next(array_pipeline.train_batches(source, "train", local_batch_size=2, seed=0, indices=[N]))


def test_eval_batches_cover_every_example_once_with_padding(source):
    # 13 test images, 3 processes, batch 2: the largest shard holds 5 -> 3 batches each.
    assert array_pipeline.num_eval_batches(13, local_batch_size=2, process_count=3) == 3
    seen = []
    for p in range(3):
        batches = list(
            array_pipeline.eval_batches(source, "test", local_batch_size=2, process_index=p, process_count=3)
        )
        assert len(batches) == 3
        for b in batches:
            real = b["mask"] == 1
            assert np.all(b["index"][~real] == -1) and np.all(b["image"][~real] == 0)
            assert np.array_equal(b["index"][real], ids_of(b)[real])
            seen += list(b["index"][real])
    assert sorted(seen) == list(range(13))
