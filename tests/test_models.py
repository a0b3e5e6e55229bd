"""SK-ResNet family and heads against independent references (paper table, NumPy, hand counts)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from np_reference import batch_norm_train, conv2d_same_stride1, conv2d_valid, pad_hw, relu, softmax

from simclrv2_jax.config.fields import model_preset
from simclrv2_jax.models import SimCLRModel, parameter_counts
from simclrv2_jax.models.heads import ProjectionHead
from simclrv2_jax.models.layers import BatchNorm, Conv, SKConv

# Paper Table 1, backbone parameters in millions.
PAPER_BACKBONE_MILLIONS = {
    "r50_1x_sk0": 24,
    "r50_1x_sk1": 35,
    "r50_2x_sk0": 94,
    "r50_2x_sk1": 140,
    "r101_1x_sk0": 43,
    "r101_1x_sk1": 65,
    "r101_2x_sk0": 170,
    "r101_2x_sk1": 257,
    "r152_1x_sk0": 58,
    "r152_1x_sk1": 89,
    "r152_2x_sk0": 233,
    "r152_2x_sk1": 354,
    "r152_3x_sk1": 795,
}


@pytest.mark.parametrize("preset", sorted(PAPER_BACKBONE_MILLIONS))
def test_backbone_parameter_count_matches_paper(preset):
    counts = parameter_counts(SimCLRModel(**model_preset(preset)), image_size=224)
    # The paper counts every backbone variable, BN moving statistics included.
    assert round((counts["backbone"] + counts["backbone_bn_stats"]) / 1e6) == PAPER_BACKBONE_MILLIONS[preset]


def test_r50_trainable_count_by_hand():
    # ResNet-50 has 23,508,032 trainable parameters without its 1000-way classifier; the supervised
    # head adds 2048*1000 + 1000; the nonlinear head two 2048x2048 layers + one 2048x128, with BN.
    counts = parameter_counts(SimCLRModel(**model_preset("r50_1x_sk0")), image_size=224)
    assert counts["backbone"] == 23_508_032
    assert counts["head_supervised"] == 2048 * 1000 + 1000
    assert counts["head_projection"] == 2 * (2048 * 2048 + 2 * 2048) + 2048 * 128 + 128


@pytest.mark.parametrize("kernel,size", [(3, 8), (3, 9), (7, 10), (1, 7), (3, 7)])
def test_fixed_padding_strided_conv_matches_hand_padded_valid_conv(kernel, size):
    rng = np.random.default_rng(kernel * 100 + size)
    x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    conv = Conv(features=4, kernel_size=kernel, strides=2)
    params = conv.init(jax.random.key(0), x)
    y = np.asarray(conv.apply(params, x))
    w = np.asarray(params["params"]["kernel"])
    before = (kernel - 1) // 2
    padded = pad_hw(x, before, kernel - 1 - before)
    np.testing.assert_allclose(y, conv2d_valid(padded, w, stride=2), rtol=1e-4, atol=1e-4)
    lax_ref = jax.lax.conv_general_dilated(
        padded, w, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(y, np.asarray(lax_ref), rtol=1e-4, atol=1e-4)


def test_fixed_padding_differs_from_flax_same_on_even_input():
    # The reason for fixed padding: 'SAME' on an even input pads (0, 1), not (1, 1).
    x = np.random.default_rng(0).normal(size=(1, 8, 8, 2)).astype(np.float32)
    conv = Conv(features=2, kernel_size=3, strides=2)
    params = conv.init(jax.random.key(0), x)
    same = jax.lax.conv_general_dilated(
        x, params["params"]["kernel"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    assert not np.allclose(np.asarray(conv.apply(params, x)), np.asarray(same), atol=1e-3)


def test_stride1_conv_is_same_padded():
    x = np.random.default_rng(1).normal(size=(2, 6, 5, 3)).astype(np.float32)
    conv = Conv(features=4, kernel_size=3, strides=1)
    params = conv.init(jax.random.key(1), x)
    ref = conv2d_same_stride1(x, np.asarray(params["params"]["kernel"]))
    np.testing.assert_allclose(np.asarray(conv.apply(params, x)), ref, rtol=1e-4, atol=1e-4)


def _randomise(tree, seed):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [0.5 + 0.3 * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)]
    )


@pytest.mark.parametrize("strides", [1, 2])
def test_sk_conv_matches_numpy(strides):
    features, sk_ratio, min_dim = 4, 0.5, 3
    x = np.random.default_rng(2).normal(size=(3, 6, 6, 5)).astype(np.float32)
    module = SKConv(features=features, strides=strides, sk_ratio=sk_ratio, min_dim=min_dim)
    variables = module.init(jax.random.key(0), x, train=True)
    params = _randomise(variables["params"], 3)
    y, _ = module.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"]
    )
    p = jax.tree_util.tree_map(np.asarray, params)
    w0 = p["conv_0"]["kernel"]
    if strides == 2:
        t = conv2d_valid(pad_hw(x, 1, 1), w0, stride=2)
    else:
        t = conv2d_same_stride1(x, w0)
    t = relu(batch_norm_train(t, p["bn_0"]["bn"]["scale"], p["bn_0"]["bn"]["bias"]))
    a, b = t[..., :features], t[..., features:]
    g = (a + b).mean(axis=(1, 2), keepdims=True)
    mid = max(int(features * sk_ratio), min_dim)
    assert p["conv_1"]["kernel"].shape == (1, 1, features, mid)
    g = relu(
        batch_norm_train(
            conv2d_valid(g, p["conv_1"]["kernel"]), p["bn_1"]["bn"]["scale"], p["bn_1"]["bn"]["bias"]
        )
    )
    g = conv2d_valid(g, p["conv_2"]["kernel"])
    mix = softmax(np.stack([g[..., :features], g[..., features:]]), axis=0)
    ref = mix[0] * a + mix[1] * b
    np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-4, atol=2e-4)


def test_batch_norm_groups_normalise_each_slice_separately():
    x = np.random.default_rng(4).normal(size=(8, 3, 3, 2)).astype(np.float32) * 3 + 1
    bn = BatchNorm(num_groups=2)
    variables = bn.init(jax.random.key(0), x, train=True)
    y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    ref = np.concatenate([batch_norm_train(x[:4]), batch_norm_train(x[4:])])
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)
    # Moving averages: decay 0.9 from (0, 1) towards the average of the group statistics.
    group_mean = (x[:4].mean(axis=(0, 1, 2)) + x[4:].mean(axis=(0, 1, 2))) / 2
    np.testing.assert_allclose(np.asarray(updates["batch_stats"]["mean"]), 0.1 * group_mean, rtol=1e-5)
    # Per-device BN is TF1's fused BN: the moving variance takes each group's *unbiased* variance,
    # n / (n - 1) times the biased one, n = 4 rows x 3 x 3 = 36 values per channel.
    group_var = (x[:4].var(axis=(0, 1, 2), ddof=1) + x[4:].var(axis=(0, 1, 2), ddof=1)) / 2
    np.testing.assert_allclose(
        np.asarray(updates["batch_stats"]["var"]), 0.9 * 1.0 + 0.1 * group_var, rtol=1e-5
    )


@pytest.mark.parametrize("num_groups", [0, 1])
def test_batch_norm_moving_variance_global_biased_per_device_unbiased(num_groups):
    """TF1: global BN (its cross-replica class, not fused) averages the biased batch variance; the
    per-replica fused BN (``global_bn=False``, here one device: one group) the unbiased one."""
    x = np.random.default_rng(7).normal(size=(4, 2, 2, 3)).astype(np.float32) * 2 - 1
    bn = BatchNorm(num_groups=num_groups)
    variables = bn.init(jax.random.key(0), x, train=True)
    y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y), batch_norm_train(x), rtol=1e-4, atol=1e-4)  # biased here
    ddof = 0 if num_groups == 0 else 1
    expected = 0.9 + 0.1 * x.var(axis=(0, 1, 2), ddof=ddof)
    np.testing.assert_allclose(np.asarray(updates["batch_stats"]["var"]), expected, rtol=1e-5)


def _head_outputs(mode, layers, selector=None, out_dim=8):
    h = np.random.default_rng(5).normal(size=(6, 12)).astype(np.float32)
    from simclrv2_jax.models.heads import kept_head_layers

    num = None if selector is None else kept_head_layers(mode, layers, selector)
    head = ProjectionHead(proj_head_mode=mode, num_proj_layers=layers, proj_out_dim=out_dim, num_layers=num)
    variables = head.init(jax.random.key(0), h, train=True)
    params = _randomise(variables.get("params", {}), 6)
    hiddens, _ = head.apply(
        {"params": params, "batch_stats": variables.get("batch_stats", {})},
        h,
        train=True,
        mutable=["batch_stats"],
    )
    return h, jax.tree_util.tree_map(np.asarray, params), [np.asarray(t) for t in hiddens]


def test_nonlinear_projection_head_structure_and_values():
    h, p, hiddens = _head_outputs("nonlinear", 3)
    assert sorted(p) == ["layer_0", "layer_1", "layer_2"]
    # Middle layers: input width, no dense bias, BN with beta, ReLU.
    for name in ("layer_0", "layer_1"):
        assert sorted(p[name]["dense"]) == ["kernel"]
        assert p[name]["dense"]["kernel"].shape == (12, 12)
        assert sorted(p[name]["bn"]) == ["bias", "scale"]
    # Last layer: proj_out_dim units, BN without beta.
    assert p["layer_2"]["dense"]["kernel"].shape == (12, 8)
    assert sorted(p["layer_2"]["bn"]) == ["scale"]
    x = h
    ref = [h]
    for name in ("layer_0", "layer_1"):
        x = relu(
            batch_norm_train(x @ p[name]["dense"]["kernel"], p[name]["bn"]["scale"], p[name]["bn"]["bias"])
        )
        ref.append(x)
    ref.append(batch_norm_train(x @ p["layer_2"]["dense"]["kernel"], p["layer_2"]["bn"]["scale"]))
    assert len(hiddens) == 4
    for got, want in zip(hiddens, ref):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert (hiddens[3] < 0).any()  # no ReLU on z


def test_linear_and_none_heads():
    h, p, hiddens = _head_outputs("linear", 3)
    assert sorted(p) == ["layer_0"] and p["layer_0"]["dense"]["kernel"].shape == (12, 8)
    assert sorted(p["layer_0"]["bn"]) == ["scale"]
    np.testing.assert_allclose(
        hiddens[1],
        batch_norm_train(h @ p["layer_0"]["dense"]["kernel"], p["layer_0"]["bn"]["scale"]),
        rtol=1e-4,
        atol=1e-4,
    )
    head = ProjectionHead(proj_head_mode="none")
    out = head.apply({}, h, train=False)
    assert len(out) == 1 and out[0] is h


@pytest.mark.parametrize("selector,layers_built", [(0, 0), (1, 1), (2, 2), (-1, 3), (-2, 2), (3, 3)])
def test_ft_proj_selector_keeps_layers_up_to_selection(selector, layers_built):
    _, p, hiddens = _head_outputs("nonlinear", 3, selector=selector)
    assert sorted(p) == [f"layer_{j}" for j in range(layers_built)]
    assert len(hiddens) == layers_built + 1


def test_ft_proj_selector_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match="ft_proj_selector=4"):
        _head_outputs("nonlinear", 3, selector=4)


def _finetune_model(selector, **kw):
    return SimCLRModel(
        resnet_depth=18,
        width_multiplier=0.25,
        cifar_stem=True,
        num_classes=5,
        proj_out_dim=8,
        head_mode="finetune",
        ft_proj_selector=selector,
        **kw,
    )


@pytest.mark.parametrize("selector,expected", [(0, "h"), (1, 1), (-1, 3)])
def test_supervised_head_reads_selected_hidden(selector, expected):
    x = np.random.default_rng(7).uniform(size=(4, 16, 16, 3)).astype(np.float32)
    pre = SimCLRModel(resnet_depth=18, width_multiplier=0.25, cifar_stem=True, num_classes=5, proj_out_dim=8)
    pre_vars = pre.init(jax.random.key(0), x, train=False)
    pre_out = pre.apply(pre_vars, x, train=False)
    model = _finetune_model(selector)
    variables = model.init(jax.random.key(1), x, train=False)
    # Copy the pretrained backbone/head layers in by name: fine-tuning's tree is a subset.
    params = dict(pre_vars["params"])
    params["head_supervised"] = variables["params"]["head_supervised"]
    stats = dict(pre_vars["batch_stats"])
    for tree, new in ((params, variables["params"]), (stats, variables["batch_stats"])):
        kept = {k: v for k, v in tree.pop("head_projection").items() if k in new.get("head_projection", {})}
        if kept:
            tree["head_projection"] = kept
    out = model.apply({"params": params, "batch_stats": stats}, x, train=False)
    want = pre_out["proj_head_input"] if expected == "h" else pre_out["hiddens"][expected]
    np.testing.assert_allclose(np.asarray(out["proj_head_output"]), np.asarray(want), rtol=1e-5, atol=1e-6)
    w = np.asarray(params["head_supervised"]["dense"]["kernel"])
    bias = np.asarray(params["head_supervised"]["dense"]["bias"])
    np.testing.assert_allclose(
        np.asarray(out["logits_sup"]), np.asarray(want) @ w + bias, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("selector", [0, 1])
def test_lineareval_while_pretraining_reads_the_selected_hidden_without_gradient(selector):
    """The TF2 release: the linear head reads stop_gradient(hiddens[ft_proj_selector]) (h at 0); no
    gradient reaches the backbone or the projection head."""
    x = np.random.default_rng(8).uniform(size=(4, 16, 16, 3)).astype(np.float32)
    model = SimCLRModel(
        resnet_depth=18,
        width_multiplier=0.25,
        cifar_stem=True,
        num_classes=5,
        proj_out_dim=8,
        ft_proj_selector=selector,
    )
    variables = model.init(jax.random.key(0), x, train=False)
    out = model.apply(variables, x, train=False)
    feature = np.asarray(out["proj_head_input"] if selector == 0 else out["hiddens"][selector])
    head = variables["params"]["head_supervised"]["dense"]
    np.testing.assert_allclose(
        np.asarray(out["logits_sup"]),
        feature @ np.asarray(head["kernel"]) + np.asarray(head["bias"]),
        rtol=1e-4,
        atol=1e-5,
    )

    def sup_loss(params):
        out, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.sum(out["logits_sup"] ** 2)

    grads = jax.grad(sup_loss)(variables["params"])
    for part in ("backbone", "head_projection"):
        assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(grads[part]))
    assert float(jnp.abs(grads["head_supervised"]["dense"]["kernel"]).max()) > 0


def _endpoint_shapes(image_size, **arch):
    model = SimCLRModel(**arch, cifar_stem=image_size <= 32, num_classes=10)
    images = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
    out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0], images)
    return {k: v.shape for k, v in out.items() if k != "hiddens"}


def test_cifar_stem_keeps_32px_into_block_group1():
    shapes = _endpoint_shapes(32, resnet_depth=18, width_multiplier=1.0)
    assert shapes["initial_conv"] == (2, 32, 32, 64)
    assert shapes["initial_max_pool"] == (2, 32, 32, 64)
    assert shapes["block_group1"] == (2, 32, 32, 64)
    assert shapes["block_group4"] == (2, 4, 4, 512)
    assert shapes["final_avg_pool"] == (2, 512)


@pytest.mark.parametrize("sk_ratio", [0.0, 0.0625])
def test_imagenet_stem_gives_56px_from_224(sk_ratio):
    shapes = _endpoint_shapes(224, resnet_depth=50, width_multiplier=1.0, sk_ratio=sk_ratio)
    assert shapes["initial_conv"] == (2, 112, 112, 64)
    assert shapes["initial_max_pool"] == (2, 56, 56, 64)
    assert shapes["block_group1"] == (2, 56, 56, 256)
    assert shapes["block_group2"] == (2, 28, 28, 512)
    assert shapes["block_group4"] == (2, 7, 7, 2048)
    assert shapes["proj_head_input"] == (2, 2048)
    assert shapes["proj_head_output"] == (2, 128)
    assert shapes["logits_sup"] == (2, 10)


def test_initialisers():
    model = SimCLRModel(**model_preset("r50_1x_sk0"), num_classes=10)
    x = jnp.zeros((2, 64, 64, 3))
    params = model.init(jax.random.key(0), x, train=False)["params"]
    block = params["backbone"]["block_group1_0"]
    # Last BN of each residual branch starts at gamma 0, the others at 1.
    assert float(jnp.abs(block["bn_2"]["bn"]["scale"]).max()) == 0.0
    assert float(jnp.abs(block["bn_0"]["bn"]["scale"] - 1).max()) == 0.0
    assert float(jnp.abs(block["shortcut"]["bn"]["bn"]["scale"] - 1).max()) == 0.0
    # Variance scaling (fan_in, truncated normal): std sqrt(1/fan_in); 3x3x256 kernel of group 3.
    kernel = np.asarray(params["backbone"]["block_group3_0"]["conv_1"]["kernel"])
    fan_in = 3 * 3 * 256
    assert abs(kernel.std() - np.sqrt(1 / fan_in)) < 0.03 * np.sqrt(1 / fan_in)
    assert np.abs(kernel).max() <= 2 * np.sqrt(1 / fan_in) / 0.87962566 + 1e-6
    # Heads: normal(0.01).
    head_kernel = np.asarray(params["head_projection"]["layer_0"]["dense"]["kernel"])
    assert abs(head_kernel.std() - 0.01) < 0.0005


def test_resnet_d_shortcut_with_sk():
    model = SimCLRModel(**model_preset("r50_1x_sk1"), num_classes=10)
    params = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False),
        jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
    )["params"]
    stem = params["backbone"]["stem"]
    assert stem["conv_0"]["kernel"].shape == (3, 3, 3, 32)
    assert stem["conv_1"]["kernel"].shape == (3, 3, 32, 32)
    assert stem["conv_2"]["kernel"].shape == (3, 3, 32, 64)
    shortcut = params["backbone"]["block_group2_0"]["shortcut"]
    assert shortcut["conv"]["kernel"].shape == (1, 1, 256, 512)
    sk = params["backbone"]["block_group2_0"]["sk_conv"]
    assert sk["conv_0"]["kernel"].shape == (3, 3, 128, 256)
    assert sk["conv_1"]["kernel"].shape == (1, 1, 128, 32)  # max(int(128 * 0.0625), 32)


def test_resnet_d_average_pool_shortcut_values():
    from simclrv2_jax.models.resnet import Shortcut

    x = np.random.default_rng(9).normal(size=(2, 5, 5, 3)).astype(np.float32)
    module = Shortcut(features=4, strides=2, resnet_d=True)
    variables = module.init(jax.random.key(0), x, train=True)
    y, _ = module.apply(variables, x, train=True, mutable=["batch_stats"])
    # Pad (0, 1) then 2x2/2 VALID average pooling, then a 1x1 conv and BN.
    padded = pad_hw(x, 0, 1)
    pooled = (
        padded[:, 0::2, 0::2] + padded[:, 1::2, 0::2] + padded[:, 0::2, 1::2] + padded[:, 1::2, 1::2]
    ) / 4
    ref = batch_norm_train(conv2d_valid(pooled, np.asarray(variables["params"]["conv"]["kernel"])))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)


def test_unknown_depth_is_a_clear_error():
    model = SimCLRModel(resnet_depth=42, width_multiplier=0.25, cifar_stem=True)
    with pytest.raises(ValueError, match="resnet_depth=42"):
        model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)


def test_remat_keeps_parameters_outputs_and_gradients():
    """Rematerialising the blocks changes where activations live, nothing computed: the same
    parameter tree, outputs, BN statistics and gradients as without."""
    arch = dict(resnet_depth=18, width_multiplier=0.125, sk_ratio=0.0625, proj_out_dim=8, cifar_stem=True)
    images = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3))
    plain, remat = SimCLRModel(**arch), SimCLRModel(**arch, remat=True)
    variables = plain.init(jax.random.key(1), images, train=False)
    assert jax.tree_util.tree_structure(remat.init(jax.random.key(1), images, train=False)) == (
        jax.tree_util.tree_structure(variables)
    )

    def loss(model, params):
        out, updates = model.apply(
            {**variables, "params": params}, images, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(out["proj_head_output"] ** 2), (out["final_avg_pool"], updates)

    (l0, (h0, s0)), g0 = jax.value_and_grad(lambda p: loss(plain, p), has_aux=True)(variables["params"])
    (l1, (h1, s1)), g1 = jax.value_and_grad(lambda p: loss(remat, p), has_aux=True)(variables["params"])
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    np.testing.assert_allclose(h1, h0, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves((g1, s1)), jax.tree_util.tree_leaves((g0, s0))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(g0))

    # ... and the blocks are rematerialised: a checkpoint per residual block (8 in ResNet-18).
    def rematerialised(model) -> int:
        jaxpr = str(jax.make_jaxpr(lambda p: loss(model, p)[0])(variables["params"]))
        return len(re.findall(r"= (?:remat2|checkpoint)\[", jaxpr))

    assert rematerialised(remat) == 8 and rematerialised(plain) == 0


@pytest.mark.parametrize("frozen", [2, 4])
def test_frozen_blocks_batch_norm_follows_the_tf1_release(frozen):
    """fine_tune_after_block = 2: the frozen stem still normalises with the batch's statistics and moves
    its moving statistics by (1 - decay) towards them, computed here from its input (the stem conv's
    output, ``initial_conv``); = 4 (linear evaluation): the backbone runs in inference mode, its
    statistics stay and its outputs are the inference outputs."""
    model = SimCLRModel(
        resnet_depth=18,
        width_multiplier=0.125,
        cifar_stem=True,
        head_mode="finetune",
        ft_proj_selector=0,
        num_classes=10,
        fine_tune_after_block=frozen,
    )
    x = jax.random.uniform(jax.random.key(1), (8, 16, 16, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    before, after = variables["batch_stats"]["backbone"], updates["batch_stats"]["backbone"]
    inference = model.apply(variables, x, train=False)
    if frozen == 2:
        conv = np.asarray(out["initial_conv"], np.float64)
        mean, var = conv.mean(axis=(0, 1, 2)), conv.var(axis=(0, 1, 2))
        bn = after["stem"]["bn_0"]["bn"]
        np.testing.assert_allclose(bn["mean"], 0.9 * 0.0 + 0.1 * mean, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(bn["var"], 0.9 * 1.0 + 0.1 * var, rtol=1e-5, atol=1e-7)
        for part in ("block_group1_0", "block_group2_1"):
            assert not np.allclose(after[part]["bn_0"]["bn"]["mean"], before[part]["bn_0"]["bn"]["mean"])
        assert not np.allclose(out["block_group1"], inference["block_group1"], atol=1e-4)
    else:
        for path, leaf in jax.tree_util.tree_leaves_with_path(after):
            np.testing.assert_array_equal(leaf, flat_get(before, path), err_msg=jax.tree_util.keystr(path))
        np.testing.assert_allclose(out["final_avg_pool"], inference["final_avg_pool"], rtol=1e-6, atol=1e-6)


def flat_get(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree
