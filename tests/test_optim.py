"""Optimiser, masks and schedule checked against hand-written NumPy and hand-computed numbers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simclrv2_jax.train import optim


def _params(rng):
    return {
        "conv": {"kernel": rng.randn(3, 3, 2, 4)},
        "bn": {"scale": rng.rand(4) + 0.5, "bias": rng.randn(4)},
        "dense": {"kernel": rng.randn(4, 3), "bias": rng.randn(3)},
        # zero-initialised: ||w|| = 0, so the trust ratio must fall back to 1
        "proj": {"kernel": np.zeros((3, 3))},
        "BatchNorm_0": {"scale": rng.rand(3) + 0.5, "bias": rng.randn(3)},
        "head_supervised": {"kernel": rng.randn(3, 5), "bias": rng.randn(5)},
    }


DECAYED = {("conv", "kernel"), ("dense", "kernel"), ("proj", "kernel")}


def _flat(tree):
    return {
        tuple(k.key for k in path): np.asarray(v, np.float64)
        for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _np_lars(params, grads_seq, lrs, momentum, wd, eeta):
    """The official SimCLR LARS update, per variable, in float64."""
    w = {k: v.copy() for k, v in params.items()}
    v = {k: np.zeros_like(x) for k, x in params.items()}
    for grads, lr in zip(grads_seq, lrs):
        for k in w:
            g = grads[k].copy()
            if k in DECAYED:
                g = g + wd * w[k]
                w_norm, g_norm = np.linalg.norm(w[k]), np.linalg.norm(g)
                trust = eeta * w_norm / g_norm if (w_norm > 0 and g_norm > 0) else 1.0
            else:
                trust = 1.0
            v[k] = momentum * v[k] + lr * trust * g
            w[k] = w[k] - v[k]
    return w


def test_decay_mask():
    mask = _flat(optim.decay_mask(_params(np.random.RandomState(0))))
    assert {k for k, m in mask.items() if m} == DECAYED
    assert len(mask) == 10


@pytest.mark.parametrize("schedule", [False, True])
def test_lars_matches_official_update(schedule):
    rng = np.random.RandomState(0)
    params = _params(rng)
    grads_seq = [jax.tree_util.tree_map(lambda x: rng.randn(*x.shape), params) for _ in range(3)]
    # one zero gradient on a decayed kernel: g = wd * w is then nonzero, still adapted
    grads_seq[1]["dense"]["kernel"] = np.zeros((4, 3))
    lrs = [0.5, 0.3, 0.1] if schedule else [0.4] * 3
    lr = (lambda count: jnp.asarray(lrs)[count]) if schedule else 0.4
    momentum, wd = 0.9, 0.01

    tx = optim.make_optimizer(optimizer="lars", learning_rate=lr, momentum=momentum, weight_decay=wd)
    p = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = tx.init(p)
    update = jax.jit(tx.update)
    for grads in grads_seq:
        g = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), grads)
        updates, state = update(g, state, p)
        p = optax.apply_updates(p, updates)

    ref = _np_lars(_flat(params), [_flat(g) for g in grads_seq], lrs, momentum, wd, 1e-3)
    got = _flat(p)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, atol=1e-6, err_msg=str(k))

    # Plain momentum SGD (no decay, no trust) on BN, biases and the supervised head, by hand.
    for k in [
        ("bn", "scale"),
        ("bn", "bias"),
        ("dense", "bias"),
        ("BatchNorm_0", "bias"),
        ("head_supervised", "kernel"),
        ("head_supervised", "bias"),
    ]:
        g = [_flat(gs)[k] for gs in grads_seq]
        v1 = lrs[0] * g[0]
        v2 = momentum * v1 + lrs[1] * g[1]
        v3 = momentum * v2 + lrs[2] * g[2]
        np.testing.assert_allclose(got[k], _flat(params)[k] - v1 - v2 - v3, rtol=2e-5, atol=1e-6)
    # The zero kernel moved by the full lr (trust 1), not by eeta * 0 = nothing.
    assert np.abs(got[("proj", "kernel")]).max() > 0.1


def test_lars_mask_forms_agree():
    params = jax.tree_util.tree_map(jnp.asarray, _params(np.random.RandomState(1)))
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    outs = []
    for mask in [optim.decay_mask(params), optim.decay_mask]:
        tx = optim.lars(0.1, weight_decay=1e-2, mask=mask)
        outs.append(_flat(tx.update(grads, tx.init(params), params)[0]))
    for o in outs[1:]:
        for k in o:
            np.testing.assert_array_equal(o[k], outs[0][k])


def test_momentum_is_nesterov_and_adam_builds():
    # tf.train.MomentumOptimizer(use_nesterov=True): a = m*a + g; w -= lr * (g + m*a)
    w0, lr, m = np.array([1.0, -2.0]), 0.1, 0.9
    gs = [np.array([0.5, 1.0]), np.array([-1.0, 2.0])]
    tx = optim.make_optimizer(optimizer="momentum", learning_rate=lr, momentum=m)
    w, state, a, w_ref = jnp.asarray(w0), None, np.zeros(2), w0.copy()
    state = tx.init(w)
    for g in gs:
        u, state = tx.update(jnp.asarray(g), state, w)
        w = w + u
        a = m * a + g
        w_ref = w_ref - lr * (g + m * a)
    np.testing.assert_allclose(np.asarray(w), w_ref, rtol=1e-6)
    tx = optim.make_optimizer(optimizer="adam", learning_rate=1e-3)
    u, _ = tx.update(jnp.asarray(gs[0]), tx.init(jnp.asarray(w0)))
    np.testing.assert_allclose(np.asarray(u), -1e-3 * np.sign(gs[0]), rtol=1e-4)


def test_unknown_optimizer_raises():
    with pytest.raises(ValueError, match=r"optimizer 'sgd'.*lars"):
        optim.make_optimizer(optimizer="sgd", learning_rate=0.1)
    with pytest.raises(ValueError, match="optimizer"):
        optim.weight_decay_loss({}, weight_decay=1.0, optimizer="rmsprop")


def test_get_train_steps():
    assert optim.get_train_steps(50000, 100, 512) == 9766  # 5_000_000 // 512 = 9765, + 1
    assert optim.get_train_steps(1281167, 800, 4096) == 250228  # 1_024_933_600 // 4096 + 1
    assert optim.get_train_steps(1000, 10, 100) == 101
    assert optim.get_train_steps(1000, 10, 100, train_steps=7) == 7


def test_scaled_learning_rate():
    assert optim.scaled_learning_rate(0.3, 512, "linear") == pytest.approx(0.6)
    assert optim.scaled_learning_rate(0.1, 4096, "sqrt") == pytest.approx(6.4)
    with pytest.raises(ValueError, match="learning_rate_scaling"):
        optim.scaled_learning_rate(0.1, 4096, "cubic")


def test_learning_rate_schedule_values():
    sched = optim.learning_rate_schedule(
        base_learning_rate=0.5,
        batch_size=256,
        num_examples=2560,
        learning_rate_scaling="linear",
        warmup_epochs=10,
        total_steps=300,
    )
    # warmup_steps = round(10 * 2560 // 256) = 100, scaled lr 0.5, cosine over 200 steps
    expected = {
        0: 0.0,
        50: 0.25,
        99: 0.495,
        100: 0.5,
        150: 0.5 * 0.5 * (1 + math.cos(math.pi / 4)),
        200: 0.25,
        300: 0.0,
        350: 0.0,
    }
    for step, lr in expected.items():
        assert float(sched(step)) == pytest.approx(lr, abs=1e-6), step
    jitted = jax.jit(sched)(jnp.asarray(150))
    assert float(jitted) == pytest.approx(expected[150], abs=1e-6)

    # sqrt scaling, fractional warmup epochs: 0.5 * 1000 // 64 = 7.0 -> 7 warmup steps.
    sched = optim.learning_rate_schedule(
        base_learning_rate=0.1,
        batch_size=64,
        num_examples=1000,
        learning_rate_scaling="sqrt",
        warmup_epochs=0.5,
        total_steps=17,
    )
    assert float(sched(7)) == pytest.approx(0.8, rel=1e-6)
    assert float(sched(12)) == pytest.approx(0.4, rel=1e-6)  # halfway through 10 cosine steps
    assert float(sched(3)) == pytest.approx(0.8 * 3 / 7, rel=1e-6)

    # no warmup: the cosine starts at the full rate
    sched = optim.learning_rate_schedule(
        base_learning_rate=1.0,
        batch_size=256,
        num_examples=1000,
        learning_rate_scaling="linear",
        warmup_epochs=0,
        total_steps=10,
    )
    assert float(sched(0)) == pytest.approx(1.0)
    assert float(sched(5)) == pytest.approx(0.5, abs=1e-6)


def test_weight_decay_loss():
    params = _params(np.random.RandomState(2))
    f = _flat(params)
    sq = {k: 0.5 * np.sum(v**2) for k, v in f.items()}
    got = optim.weight_decay_loss(params, weight_decay=1e-3, optimizer="lars")
    np.testing.assert_allclose(float(got), 1e-3 * sq[("head_supervised", "kernel")], rtol=1e-6)
    bn = {("bn", "scale"), ("bn", "bias"), ("BatchNorm_0", "scale"), ("BatchNorm_0", "bias")}
    expected = 1e-3 * sum(v for k, v in sq.items() if k not in bn)
    for opt in ["momentum", "adam"]:
        got = optim.weight_decay_loss(params, weight_decay=1e-3, optimizer=opt)
        np.testing.assert_allclose(float(got), expected, rtol=1e-6)


def test_global_norm():
    tree = {"a": jnp.asarray([3.0, 0.0]), "b": {"c": jnp.asarray([[4.0]])}}
    assert float(optim.global_norm(tree)) == pytest.approx(5.0)
