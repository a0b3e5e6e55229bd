"""Losses checked against float64 NumPy references written from SPEC.md, and across device counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from simclrv2_jax.train import losses


def _np_log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _np_nt_xent(z, temperature, hidden_norm, large_num=1e9):
    """SPEC.md's formula, row by row in float64."""
    z = np.asarray(z, np.float64)
    if hidden_norm:
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = z.shape[0] // 2
    za, zb = z[:n], z[n:]
    eye = np.eye(n)
    ab = za @ zb.T / temperature
    aa = za @ za.T / temperature - large_num * eye
    bb = zb @ zb.T / temperature - large_num * eye
    ba = zb @ za.T / temperature
    loss_a = np.array([-_np_log_softmax(np.concatenate([ab, aa], 1))[i, i] for i in range(n)])
    loss_b = np.array([-_np_log_softmax(np.concatenate([ba, bb], 1))[i, i] for i in range(n)])
    p = np.exp(_np_log_softmax(ab))
    entropy = -np.mean(np.sum(p * np.log(p), axis=1))
    return np.mean(loss_a + loss_b), entropy


@pytest.mark.parametrize(
    "n,d,temperature,hidden_norm",
    [(4, 8, 0.5, True), (8, 16, 0.1, True), (5, 3, 1.0, False), (16, 32, 0.2, True)],
)
def test_nt_xent_matches_numpy(n, d, temperature, hidden_norm):
    rng = np.random.RandomState(n * 100 + d)
    z = rng.randn(2 * n, d).astype(np.float32)
    if not hidden_norm:
        z *= 0.3  # keeps unnormalised logits in a range float32 resolves well
    loss, aux = losses.nt_xent_loss(jnp.asarray(z), temperature=temperature, hidden_norm=hidden_norm)
    ref_loss, ref_entropy = _np_nt_xent(z, temperature, hidden_norm)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(float(aux["contrast_entropy"]), ref_entropy, rtol=1e-4, atol=1e-6)


def test_nt_xent_bf16_input_computes_in_float32():
    z = np.random.RandomState(0).randn(8, 4).astype(np.float32)
    z_bf16 = jnp.asarray(z, jnp.bfloat16)
    loss, _ = losses.nt_xent_loss(z_bf16, temperature=0.1)
    assert loss.dtype == jnp.float32
    # The reference sees the same bf16-rounded values, so only float32 arithmetic separates them.
    ref, _ = _np_nt_xent(np.asarray(z_bf16, np.float32), 0.1, True)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_contrast_acc_on_constructed_case():
    # 4 examples, one-hot directions. View B of examples 0 and 1 match their view A exactly; view B of
    # example 2 points at example 3's view A direction and vice versa, so rows 2 and 3 of logits_ab
    # peak off the diagonal: accuracy 2/4.
    e = np.eye(4, dtype=np.float32)
    za = e
    zb = e[[0, 1, 3, 2]]
    _, aux = losses.nt_xent_loss(jnp.asarray(np.concatenate([za, zb])), temperature=0.1)
    assert float(aux["contrast_acc"]) == pytest.approx(0.5)
    _, aux = losses.nt_xent_loss(jnp.asarray(np.concatenate([za, za])), temperature=0.1)
    assert float(aux["contrast_acc"]) == pytest.approx(1.0)


def test_nt_xent_self_similarity_excluded():
    # Every row identical: the only finite-weight terms are 2N-1 equal logits (N from the other view,
    # N-1 from the own view once the self term is masked), so each direction's CE is log(2N - 1).
    n = 6
    z = jnp.ones((2 * n, 5))
    loss, _ = losses.nt_xent_loss(z, temperature=0.5)
    np.testing.assert_allclose(float(loss), 2 * np.log(2 * n - 1), rtol=1e-6)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_nt_xent_same_loss_and_grad_on_1_and_8_devices(axis_type):
    assert jax.device_count() >= 8, "tests/conftest.py should provide 8 virtual CPU devices"
    z = np.random.RandomState(3).randn(32, 8).astype(np.float32)

    def loss_fn(z):
        return losses.nt_xent_loss(z, temperature=0.2, mesh_axis="data")

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss1, aux1), grad1 = jax.device_get(step(jax.device_put(z, jax.devices()[0])))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,), devices=jax.devices()[:8])
    z8 = jax.device_put(z, NamedSharding(mesh, P("data")))
    (loss8, aux8), grad8 = step(z8)
    assert len(grad8.sharding.device_set) == 8
    loss8, aux8, grad8 = jax.device_get((loss8, aux8, grad8))
    np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
    np.testing.assert_allclose(grad8, grad1, rtol=1e-5, atol=1e-7)
    assert aux8["contrast_acc"] == aux1["contrast_acc"]
    np.testing.assert_allclose(aux8["contrast_entropy"], aux1["contrast_entropy"], rtol=1e-6)
    # And the 1-device value is the NumPy one, so both are right, not merely equal.
    np.testing.assert_allclose(loss1, _np_nt_xent(z, 0.2, True)[0], rtol=1e-5)


def test_supervised_cross_entropy_matches_numpy_with_mask():
    rng = np.random.RandomState(1)
    logits = rng.randn(6, 5).astype(np.float32) * 2
    labels = np.array([0, 4, 2, 2, 1, 3])
    mask = np.array([1, 0, 1, 1, 0, 1], np.float32)
    ce = -_np_log_softmax(logits.astype(np.float64))[np.arange(6), labels]
    np.testing.assert_allclose(
        float(losses.supervised_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))), ce.mean(), rtol=1e-6
    )
    np.testing.assert_allclose(
        float(
            losses.supervised_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), mask=jnp.asarray(mask))
        ),
        (ce * mask).sum() / mask.sum(),
        rtol=1e-6,
    )
    one_hot = np.eye(5, dtype=np.float32)[labels]
    np.testing.assert_allclose(
        float(
            losses.supervised_cross_entropy(
                jnp.asarray(logits), jnp.asarray(one_hot), mask=jnp.asarray(mask), num_classes=5
            )
        ),
        (ce * mask).sum() / mask.sum(),
        rtol=1e-6,
    )
    # An all-padding batch contributes 0, not NaN.
    assert (
        float(losses.supervised_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), mask=jnp.zeros(6)))
        == 0.0
    )
    with pytest.raises(ValueError, match="num_classes"):
        losses.supervised_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), num_classes=10)


def test_distillation_loss_matches_numpy_and_blocks_teacher_gradient():
    """The release's colabs: tau^2 * softmax cross-entropy(p_T(tau), s / tau), mean over examples."""
    rng = np.random.RandomState(2)
    student = rng.randn(5, 7).astype(np.float32)
    teacher = rng.randn(5, 7).astype(np.float32) * 3
    mask = np.array([1, 1, 0, 1, 0], np.float32)
    tau = 2.0
    t = np.exp(_np_log_softmax(teacher.astype(np.float64) / tau))
    per = -(t * _np_log_softmax(student.astype(np.float64) / tau)).sum(1) * tau**2
    got = losses.distillation_loss(jnp.asarray(student), jnp.asarray(teacher), temperature=tau)
    np.testing.assert_allclose(float(got), per.mean(), rtol=1e-6)
    got = losses.distillation_loss(
        jnp.asarray(student), jnp.asarray(teacher), temperature=tau, mask=jnp.asarray(mask)
    )
    np.testing.assert_allclose(float(got), (per * mask).sum() / mask.sum(), rtol=1e-6)

    g_teacher = jax.grad(lambda t_: losses.distillation_loss(jnp.asarray(student), t_, temperature=tau))(
        jnp.asarray(teacher)
    )
    assert not np.any(np.asarray(g_teacher))
    # d/ds of the loss is tau^2 (softmax(s/tau) - p_T) / (tau * B) = tau (softmax(s/tau) - p_T) / B.
    g_student = jax.grad(lambda s_: losses.distillation_loss(s_, jnp.asarray(teacher), temperature=tau))(
        jnp.asarray(student)
    )
    s = np.exp(_np_log_softmax(student.astype(np.float64) / tau))
    np.testing.assert_allclose(np.asarray(g_student), tau * (s - t) / 5, rtol=1e-5, atol=1e-7)


def test_topk_correct_and_accuracy():
    logits = jnp.asarray(
        [[0.1, 0.5, 0.2, 0.0], [3.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
    )
    labels = jnp.asarray([1, 2, 0, 3])
    # row 0: label is the max; row 1: label is 2nd; row 2: label tied 2nd-4th, wins the tie to the
    # lower index; row 3: all tied, so the top-1/top-2 are classes 0 and 1, not the label 3.
    np.testing.assert_array_equal(losses.topk_correct(logits, labels, 1), [1, 0, 0, 0])
    np.testing.assert_array_equal(losses.topk_correct(logits, labels, 2), [1, 1, 1, 0])
    np.testing.assert_array_equal(losses.topk_correct(logits, labels, 4), [1, 1, 1, 1])
    np.testing.assert_array_equal(losses.topk_correct(logits, jax.nn.one_hot(labels, 4), 2), [1, 1, 1, 0])
    assert float(losses.accuracy(logits, labels)) == pytest.approx(0.25)
    mask = jnp.asarray([1.0, 1.0, 1.0, 0.0])
    assert float(losses.accuracy(logits, labels, mask=mask)) == pytest.approx(1 / 3)
    # Evaluation sums over the real rows 0-2: top-1 hits [1, 0, 0], top-5 (= all 4 classes) [1, 1, 1],
    # cross-entropy -log softmax(row)[label] by hand, and the count of real rows.
    sums = losses.classification_eval_sums(logits, labels, mask)
    rows = np.asarray(logits)[:3]
    ce = np.log(np.exp(rows).sum(axis=1)) - rows[np.arange(3), np.asarray(labels)[:3]]
    assert float(sums["top1"]) == 1.0 and float(sums["top5"]) == 3.0 and float(sums["count"]) == 3.0
    assert float(sums["loss"]) == pytest.approx(ce.sum(), rel=1e-6)
