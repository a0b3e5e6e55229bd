"""param_sharding='fsdp': parameters and optimiser state split over the devices, same results.

The reference is the replicated run of the shared ``pretrain_run`` fixture (8 devices, 6 steps).
"""

import jax
import numpy as np
import pytest
from conftest import PRETRAIN_STEPS, assert_states_close, flat, raise_at, read_checkpoint, saved_steps, tiny
from jax.sharding import PartitionSpec as P

from simclrv2_jax.config import get_config
from simclrv2_jax.train import parallel, train_stage

# Whole runs, subprocesses or processes: left out of the fast loop (launch/test.sh --fast).
pytestmark = pytest.mark.slow


N = PRETRAIN_STEPS
# The tiny test ResNet's largest kernels have 2-4k elements: a low threshold splits most of them.
MIN_SIZE = 256


def config(data_dir, **overrides):
    return tiny(get_config("pretrain", "fashion_mnist"), data_dir, train_steps=N, **overrides)


@pytest.mark.parametrize(
    "shape, devices, min_size, expected",
    [
        ((3, 3, 64, 128), 8, 2**14, P(None, None, None, "data")),  # 73,728 elements; 128 is largest
        ((3, 3, 64, 60), 8, 2**14, P(None, None, "data")),  # 60 does not split 8 ways, 64 does
        ((2048, 2048), 8, 2**14, P("data")),  # equal dimensions: the first
        ((3, 3, 16, 16), 8, 2**14, P()),  # 2,304 elements: under the threshold
        ((128,), 8, 2**14, P()),
        ((10, 100), 8, 16, P()),  # nothing divides by 8
        ((4096, 10), 1, 16, P()),  # one device: nothing to split
        ((), 8, 0, P()),  # a scalar
    ],
)
def test_fsdp_spec_by_hand(shape, devices, min_size, expected):
    assert parallel.fsdp_spec(shape, devices, min_size) == expected


def test_bytes_per_device_by_hand():
    mesh = parallel.create_mesh(8)
    tree = {
        "kernel": jax.ShapeDtypeStruct((3, 3, 64, 128), np.float32),  # split: 73,728 / 8 * 4 bytes
        "bias": jax.ShapeDtypeStruct((128,), np.float32),  # replicated: 512 bytes
    }
    assert parallel.ParamLayout(mesh, "fsdp").bytes_per_device(tree) == 73_728 // 8 * 4 + 512
    assert parallel.ParamLayout(mesh, "replicated").bytes_per_device(tree) == 73_728 * 4 + 512


def test_unknown_layout_is_one_error(fake_data_dir, tmp_path):
    with pytest.raises(ValueError, match="config.param_sharding='zero3' is invalid"):
        train_stage(config(fake_data_dir, param_sharding="zero3"), str(tmp_path / "bad"))


def _split_leaves(tree):
    """``{path: (global shape, one device's shard shape, spec)}`` of the leaves that are split."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shard = leaf.addressable_shards[0].data.shape
        if shard != leaf.shape:
            out[jax.tree_util.keystr(path)] = (leaf.shape, shard, leaf.sharding.spec)
    return out


def test_fsdp_equals_replicated_and_splits_the_state(fake_data_dir, tmp_path, pretrain_run):
    layouts = {}

    def record_layout(step, state):
        if step == 1:
            layouts.update(
                params=_split_leaves(state.params),
                opt_state=_split_leaves(state.opt_state),
                batch_stats=_split_leaves(state.batch_stats),
            )

    fsdp = config(fake_data_dir, param_sharding="fsdp", fsdp_min_size=MIN_SIZE)
    results = train_stage(fsdp, str(tmp_path / "fsdp"), step_hooks=[record_layout])

    # Every parameter of at least MIN_SIZE elements with a dimension divisible by 8 is split 8 ways
    # along its largest such dimension (counted here from the shapes alone), and so is its momentum.
    expected = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(results["state"].params):
        dims = [d for d, n in enumerate(leaf.shape) if n % 8 == 0]
        if leaf.size >= MIN_SIZE and dims:
            dim = max(dims, key=lambda d: (leaf.shape[d], -d))
            shard = tuple(n // 8 if d == dim else n for d, n in enumerate(leaf.shape))
            expected[jax.tree_util.keystr(path)] = (leaf.shape, shard)
    assert len(expected) >= 10, "the tiny model has kernels to split"
    assert {k: v[:2] for k, v in layouts["params"].items()} == expected
    momentum = {k.split("]", 2)[-1]: v[:2] for k, v in layouts["opt_state"].items()}
    assert sorted(momentum.values()) == sorted(expected.values())
    assert layouts["batch_stats"] == {}  # BN statistics stay whole on every device

    # The same numbers as the replicated run, to float rounding (the sums over devices are
    # reduce-scatters here, all-reduces there).
    assert_states_close(results["state"], pretrain_run["results"]["state"], rtol=2e-4, atol=2e-6)
    assert results["final_step"] == N


def test_checkpoints_cross_layouts_and_device_counts(fake_data_dir, tmp_path, pretrain_run):
    """fsdp on 8 devices, stopped at step 2; resumed replicated on 4, stopped at 4; finished with
    fsdp on 2. Each restore lands in the new layout and the run ends where the uninterrupted
    replicated 8-device run ends."""
    workdir = str(tmp_path / "crossing")
    fsdp = config(fake_data_dir, param_sharding="fsdp", fsdp_min_size=MIN_SIZE)
    with pytest.raises(KeyboardInterrupt):
        train_stage(fsdp, workdir, step_hooks=[raise_at(2, KeyboardInterrupt())])
    assert saved_steps(workdir) == [2]
    saved = flat(read_checkpoint(workdir, 2)["params"])
    for k, v in flat(pretrain_run["snapshots"][2].params).items():
        np.testing.assert_allclose(saved[k], v, rtol=2e-4, atol=2e-6, err_msg=k)

    seen_layouts = []

    def layout_of(step, state):
        seen_layouts.append(
            (step, len(state.params["backbone"]["stem"]["conv_0"]["kernel"].sharding.device_set))
        )

    with pytest.raises(KeyboardInterrupt):
        train_stage(
            config(fake_data_dir),
            workdir,
            mesh=parallel.create_mesh(4),
            step_hooks=[layout_of, raise_at(4, KeyboardInterrupt())],
        )
    results = train_stage(fsdp, workdir, mesh=parallel.create_mesh(2), step_hooks=[layout_of])
    assert [s for s, _ in seen_layouts] == [3, 4, 5, 6]
    assert [n for _, n in seen_layouts] == [4, 4, 2, 2]
    assert results["final_step"] == N
    assert_states_close(results["state"], pretrain_run["results"]["state"], rtol=1e-3, atol=1e-5)
