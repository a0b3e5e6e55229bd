"""scan_blocks: each block group's repeated blocks as one scanned loop, with stacked weights.

The references are the unrolled model (one module per block), the layout written out by hand, and
``optax.lars`` on the unrolled tree; the run-level test crosses layouts and parameter layouts
mid-run and ends where the shared replicated, unrolled run (``pretrain_run``) ends.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import PRETRAIN_STEPS, assert_states_close, flat, raise_at, read_checkpoint, saved_steps, tiny
from jax.sharding import PartitionSpec as P

from simclrv2_jax import checkpoints
from simclrv2_jax.config import get_config
from simclrv2_jax.models import SimCLRModel, block_stack
from simclrv2_jax.train import optim, parallel, train_stage

# Bottleneck SK blocks, 1/3/1/2 per group: groups 2 and 4 scan 2 and 1 blocks, 1 and 3 none.
ARCH = dict(
    resnet_depth=3 * 7 + 2,
    block_counts=(1, 3, 1, 2),
    width_multiplier=0.125,
    sk_ratio=0.0625,
    proj_out_dim=8,
    cifar_stem=True,
)


def _by_hand_tree():
    rng = np.random.default_rng(0)
    block = lambda: {
        "conv_0": {"kernel": rng.normal(size=(1, 1, 4, 2))},
        "bn_0": {"scale": rng.normal(size=2)},
    }
    return {
        "stem": {"conv_0": {"kernel": rng.normal(size=(3, 3, 1, 4))}},
        "block_group1_0": block(),
        "block_group2_0": block(),
        "block_group2_1": block(),
        "block_group2_2": block(),
        "block_group2_3": block(),
    }


def test_stack_and_unstack_by_hand():
    tree = _by_hand_tree()
    stacked = block_stack.stack({"backbone": tree})["backbone"]
    assert sorted(stacked) == ["block_group1_0", "block_group2_0", "block_group2_scan", "stem"]
    rows = stacked["block_group2_scan"]["block"]["conv_0"]["kernel"]
    assert rows.shape == (3, 1, 1, 4, 2)
    for i in (1, 2, 3):  # block i is row i - 1
        np.testing.assert_array_equal(rows[i - 1], tree[f"block_group2_{i}"]["conv_0"]["kernel"])
    np.testing.assert_array_equal(
        stacked["block_group2_0"]["bn_0"]["scale"], tree["block_group2_0"]["bn_0"]["scale"]
    )
    assert block_stack.is_stacked(stacked) and not block_stack.is_stacked(tree)
    back = block_stack.unstack(stacked)
    assert flat(back).keys() == flat(tree).keys()
    for k, v in flat(tree).items():
        np.testing.assert_array_equal(flat(back)[k], v)
    # Idempotent in the right direction; NamedTuples (optimiser states) and lists are walked too.
    assert block_stack.to_layout(stacked, True) is stacked
    state = (optax.EmptyState(), optax.TraceState(trace={"backbone": tree}), [tree])
    converted = block_stack.stack(state)
    assert isinstance(converted[1], optax.TraceState)
    assert "block_group2_scan" in converted[1].trace["backbone"] and "block_group2_scan" in converted[2][0]


def test_stacking_refuses_a_gap():
    tree = _by_hand_tree()
    del tree["block_group2_2"]
    with pytest.raises(ValueError, match=r"block_group2 has blocks \[1, 3\]"):
        block_stack.stack(tree)


def close(got, want, tolerance, what):
    """|got - want| <= tolerance * max |want|, elementwise."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = float(np.abs(want).max())
    error = float(np.abs(got - want).max())
    assert error <= tolerance * scale, f"{what}: max error {error:.3g} against max value {scale:.3g}"


def _variables(model, images, seed=1):
    return model.init(jax.random.key(seed), images, train=False)


@pytest.mark.slow
@pytest.mark.parametrize("remat", [False, True])
def test_scanned_model_computes_what_the_unrolled_one_does(remat):
    images = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3))
    plain, scanned = SimCLRModel(**ARCH), SimCLRModel(**ARCH, scan_blocks=True, remat=remat)
    variables = _variables(plain, images)

    # BN scales and offsets moved off their initialisation (the last BN of each block starts at
    # gamma 0, which would hide the blocks' inner weights from the gradients).
    def perturb(path, x):
        name = jax.tree_util.keystr(path[-1:])
        if "scale" not in name and "bias" not in name:
            return x
        key = jax.random.fold_in(jax.random.key(2), hash(jax.tree_util.keystr(path)) % 2**31)
        return (1.0 if "scale" in name else 0.0) + 0.1 * jax.random.normal(key, x.shape)

    variables = {**variables, "params": jax.tree_util.tree_map_with_path(perturb, variables["params"])}
    # The scanned model's own initialisation has the stacked layout of the unrolled one's.
    own = _variables(scanned, images)
    want_shapes = jax.tree_util.tree_map(np.shape, block_stack.stack(variables))
    assert jax.tree_util.tree_map(np.shape, own) == want_shapes
    assert (
        "block_group2_scan" in own["params"]["backbone"]
        and "block_group3_scan" not in own["params"]["backbone"]
    )

    stacked = block_stack.stack(variables)

    def loss(model, params, variables):
        out, updates = model.apply(
            {**variables, "params": params}, images, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(out["proj_head_output"] ** 2), (out, updates["batch_stats"])

    (l0, (o0, s0)), g0 = jax.value_and_grad(lambda p: loss(plain, p, variables), has_aux=True)(
        variables["params"]
    )
    (l1, (o1, s1)), g1 = jax.value_and_grad(lambda p: loss(scanned, p, stacked), has_aux=True)(
        stacked["params"]
    )
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    # Float rounding only (XLA picks other conv loops inside a while loop): errors are compared
    # with each array's largest value.
    for name in ("block_group2", "block_group4", "final_avg_pool", "proj_head_output"):
        close(o1[name], o0[name], 1e-4, name)
    g1, s1 = block_stack.unstack(g1), block_stack.unstack(s1)
    for part, got, want in (("grads", g1, g0), ("batch_stats", s1, s0)):
        got, want = flat(got), flat(want)
        assert got.keys() == want.keys()
        for k in want:
            close(got[k], want[k], 1e-3, f"{part}{k}")
    assert float(jnp.abs(g0["backbone"]["block_group2_2"]["conv_0"]["kernel"]).max()) > 0

    eval_plain = plain.apply(variables, images, train=False)
    eval_scanned = scanned.apply(stacked, images, train=False)
    close(eval_scanned["final_avg_pool"], eval_plain["final_avg_pool"], 1e-4, "eval")
    # The tolerance tells layouts apart: group 2's two scanned blocks swapped is far outside it.
    swapped = jax.tree_util.tree_map(lambda x: x, stacked)
    rows = swapped["params"]["backbone"]["block_group2_scan"]
    swapped["params"]["backbone"]["block_group2_scan"] = jax.tree_util.tree_map(lambda x: x[::-1], rows)
    wrong = scanned.apply(swapped, images, train=False)["final_avg_pool"]
    with pytest.raises(AssertionError):
        close(wrong, eval_plain["final_avg_pool"], 1e-4, "swapped")

    # One loop per group with repeated blocks (groups 2 and 4), and no more.
    jaxpr = str(jax.make_jaxpr(lambda p: loss(scanned, p, stacked)[0])(stacked["params"]))
    lengths = sorted(int(n) for n in re.findall(r"\blength=(\d+)", jaxpr))
    assert lengths == [1, 2]  # group 4 (2 blocks) and group 2 (3 blocks)


def test_lars_trust_ratio_is_per_block_on_stacked_weights():
    """LARS on the stacked tree updates every block as optax.lars does on the unrolled tree, and
    one row's trust ratio is eeta * ||w_i|| / ||g_i + wd w_i|| counted in NumPy."""
    rng = np.random.default_rng(3)
    tree = {"backbone": _by_hand_tree()}
    tree = jax.tree_util.tree_map(lambda x: jnp.asarray(x * rng.uniform(0.5, 4.0), jnp.float32), tree)
    grads = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), tree)
    reference = optax.lars(
        0.5,
        weight_decay=1e-3,
        weight_decay_mask=optim.decay_mask,
        trust_ratio_mask=optim.decay_mask,
        trust_coefficient=0.001,
        eps=0.0,
        momentum=0.9,
    )
    ours = optim.lars(0.5, weight_decay=1e-3)
    stacked, stacked_grads = block_stack.stack(tree), block_stack.stack(grads)
    s_ref, s_ours = reference.init(tree), ours.init(stacked)
    for _ in range(3):
        u_ref, s_ref = reference.update(grads, s_ref, tree)
        u_ours, s_ours = ours.update(stacked_grads, s_ours, stacked)
        got, want = flat(block_stack.unstack(u_ours)), flat(u_ref)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-9, err_msg=k)

    w = np.asarray(tree["backbone"]["block_group2_2"]["conv_0"]["kernel"], np.float64)
    g = np.asarray(grads["backbone"]["block_group2_2"]["conv_0"]["kernel"], np.float64) + 1e-3 * w
    ratio = 0.001 * np.linalg.norm(w) / np.linalg.norm(g)
    first, _ = ours.update(stacked_grads, ours.init(stacked), stacked)
    row = np.asarray(first["backbone"]["block_group2_scan"]["block"]["conv_0"]["kernel"][1])
    np.testing.assert_allclose(row, -0.5 * ratio * g, rtol=1e-5)


@pytest.mark.parametrize(
    "shape, devices, min_size, stacked, expected",
    [
        ((16, 8, 4), 8, 16, False, P("data")),  # unrolled rule: the largest dimension, the leading
        ((16, 8, 4), 8, 16, True, P(None, "data")),  # stacked: never the rows' axis
        ((35, 1, 1, 3072, 768), 128, 2**14, True, P(None, None, None, "data")),
        ((100, 3, 3, 4, 4), 8, 2**10, True, P()),  # 144 elements per row: under the threshold
        ((8, 100), 8, 16, True, P()),  # only the rows' axis divides
    ],
)
def test_fsdp_spec_of_stacked_weights_by_hand(shape, devices, min_size, stacked, expected):
    assert parallel.fsdp_spec(shape, devices, min_size, stacked) == expected


@pytest.mark.slow
def test_checkpoints_load_into_either_layout(pretrain_run):
    """The unrolled pretraining checkpoint into a scanned model (a fine-tuning stage's start)."""
    config = pretrain_run["config"]
    images = jnp.zeros((1, config.image_size, config.image_size, 3))
    kw = dict(resnet_depth=config.resnet_depth, width_multiplier=config.width_multiplier, cifar_stem=True)
    kw.update(num_classes=10)
    kw.update(proj_out_dim=config.proj_out_dim, sk_ratio=config.sk_ratio)
    target = jax.eval_shape(
        lambda: SimCLRModel(**kw, scan_blocks=True).init(jax.random.key(0), images, train=False)
    )
    target = {"params": target["params"], "batch_stats": target["batch_stats"]}
    mesh = parallel.create_mesh(1)
    loaded, step = checkpoints.SavedRun(str(pretrain_run["workdir"])).load_variables(
        target, sharding=parallel.replicated(mesh)
    )
    assert step == PRETRAIN_STEPS
    saved = read_checkpoint(pretrain_run["workdir"])
    want = block_stack.stack({k: saved[k] for k in ("params", "batch_stats")})
    assert flat(loaded).keys() == flat(want).keys()
    for k, v in flat(want).items():
        np.testing.assert_array_equal(flat(loaded)[k], v, err_msg=k)


@pytest.mark.slow
def test_scanned_fsdp_steps_resume_across_layouts(fake_data_dir, tmp_path, pretrain_run):
    """Unrolled and replicated to step 2; resumed scanned with fsdp to step 4 (weights gathered one
    block per loop step); resumed unrolled and replicated to the end. Every restore converts the
    checkpoint, and the run ends where the uninterrupted unrolled run ends."""
    workdir = str(tmp_path / "scan")
    base = dict(train_steps=PRETRAIN_STEPS)
    plain = tiny(get_config("pretrain", "fashion_mnist"), fake_data_dir, **base)
    scanned = tiny(
        get_config("pretrain", "fashion_mnist"),
        fake_data_dir,
        **base,
        scan_blocks=True,
        param_sharding="fsdp",
        fsdp_min_size=256,
    )
    with pytest.raises(KeyboardInterrupt):
        train_stage(plain, workdir, step_hooks=[raise_at(2, KeyboardInterrupt())])

    seen = {}

    def record(step, state):
        seen[step] = {
            jax.tree_util.keystr(p): (leaf.shape, leaf.sharding.spec)
            for p, leaf in jax.tree_util.tree_leaves_with_path(state.params)
            if "_scan" in jax.tree_util.keystr(p)
        }

    with pytest.raises(KeyboardInterrupt):
        train_stage(scanned, workdir, step_hooks=[record, raise_at(4, KeyboardInterrupt())])
    assert saved_steps(workdir) == [2, 4]
    # Stacked on disk: one row per scanned block (ResNet-18: one per group), split off the rows' axis.
    kernel = "['backbone']['block_group3_scan']['block']['conv_1']['kernel']"
    shape, spec = seen[3][kernel]
    assert shape[0] == 1 and spec[0] is None and "data" in tuple(spec)
    on_disk = read_checkpoint(workdir, 4)
    assert on_disk["params"]["backbone"]["block_group3_scan"]["block"]["conv_1"]["kernel"].shape == shape
    unrolled = flat(block_stack.unstack(on_disk["params"]))
    for k, v in flat(pretrain_run["snapshots"][4].params).items():
        np.testing.assert_allclose(unrolled[k], v, rtol=2e-4, atol=2e-6, err_msg=k)

    results = train_stage(plain, workdir)
    assert results["final_step"] == PRETRAIN_STEPS
    assert_states_close(results["state"], pretrain_run["results"]["state"], rtol=1e-3, atol=1e-5)
