"""SimCLR augmentations checked against their stated distributions and NumPy references."""

import functools

import numpy as np
import pytest
import tensorflow as tf

from simclrv2_jax.data import augment


def _over_seeds(fn, n, batch=None):
    """Stacks ``fn(seed)`` for seeds ``[i, 1234]``, i < n, computed inside tf.data (fast, graph)."""
    ds = tf.data.Dataset.range(n).map(lambda i: fn(tf.stack([i, tf.constant(1234, tf.int64)])))
    return next(iter(ds.batch(batch or n)))


def _binomial_ok(count, n, p, sigmas=4.0):
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


# ------------------------------------------------------------------------------------------------
# Crops.


def test_crop_box_area_and_aspect_ranges():
    offset, size = _over_seeds(lambda s: augment.sample_crop_box([64, 64, 3], s), 300)
    offset, size = offset.numpy(), size.numpy().astype(np.float64)
    h, w = size[:, 0], size[:, 1]
    area = h * w / 64**2
    assert np.all(offset >= 0) and np.all(offset + size <= 64)
    assert np.all(area >= 0.08) and np.all(area <= 1.0)
    # Integer sides: some real box within a pixel of (h, w) must have an allowed aspect ratio.
    assert np.all((w + 1) / np.maximum(h - 1, 1) >= 3 / 4)
    assert np.all((w - 1) / (h + 1) <= 4 / 3)
    # The ranges are explored, not just respected.
    assert area.min() < 0.2 and area.max() > 0.9
    assert (w / h).min() < 0.85 and (w / h).max() > 1.2


def test_random_resized_crop_output_is_the_sampled_region():
    # Channel 0 holds the row, channel 1 the column: the output's range of values reveals which
    # part of the input it shows.
    rows, cols = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    coords = np.stack([rows / 63, cols / 63, np.zeros_like(rows)], -1).astype(np.float32)
    image = tf.constant(coords)
    out = _over_seeds(lambda s: augment.random_resized_crop(image, s, 64, 64), 100).numpy()
    _, size = _over_seeds(lambda s: augment.sample_crop_box([64, 64, 3], s), 100)
    assert out.shape == (100, 64, 64, 3)
    seen_h = (out[..., 0].max((1, 2)) - out[..., 0].min((1, 2))) * 63 + 1
    seen_w = (out[..., 1].max((1, 2)) - out[..., 1].min((1, 2))) * 63 + 1
    # Bicubic edge handling moves the recovered extent by under a pixel per side.
    np.testing.assert_allclose(seen_h, size.numpy()[:, 0], atol=1.5)
    np.testing.assert_allclose(seen_w, size.numpy()[:, 1], atol=1.5)
    area = seen_h * seen_w / 64**2
    assert area.min() >= 0.08 - 0.05 and area.max() <= 1.0 + 1e-6
    assert augment.random_resized_crop(image, [1, 2], 32, 24).shape == (32, 24, 3)


def test_center_crop_matches_hand_computed_window():
    image = np.random.default_rng(0).random((64, 64, 3), dtype=np.float32)
    # 0.875 * 64 = 56 rows and columns, offset (64 - 56 + 1) // 2 = 4; a same-size bicubic resize
    # samples exactly at the pixel centres.
    out = augment.center_crop(tf.constant(image), 56, 56).numpy()
    np.testing.assert_allclose(out, image[4:60, 4:60], atol=1e-5)
    # Wide 40x80 image, square target: limited by the height, 35 x 35 at offsets 3 and 23.
    wide = np.random.default_rng(1).random((40, 80, 3), dtype=np.float32)
    out = augment.center_crop(tf.constant(wide), 35, 35).numpy()
    np.testing.assert_allclose(out, wide[3:38, 23:58], atol=1e-5)


def test_preprocess_for_eval_crops_by_the_target_size():
    """The release's rule (``get_preprocess_fn``): centre crop iff ``image_size > 32``."""
    small = np.random.default_rng(2).random((28, 28, 3), dtype=np.float32)
    np.testing.assert_array_equal(
        augment.preprocess_for_eval(tf.constant(small), height=28, width=28).numpy(), small
    )
    assert augment.preprocess_for_eval(tf.constant(small), height=32, width=32).shape == (32, 32, 3)
    big = np.random.default_rng(3).random((64, 64, 3), dtype=np.float32)
    np.testing.assert_allclose(
        augment.preprocess_for_eval(tf.constant(big), height=56, width=56).numpy(), big[4:60, 4:60], atol=1e-5
    )
    # A small image for a large model (Fashion-MNIST into a 64 px network) is centre-cropped:
    # 87.5% of 28 px is 24.5, rounded to 24 px at offset 2, then resized to 64.
    crop = augment.resize(tf.constant(small[2:26, 2:26]), 64, 64)
    np.testing.assert_allclose(
        augment.preprocess_for_eval(tf.constant(small), height=64, width=64).numpy(),
        np.clip(crop.numpy(), 0, 1),
        atol=1e-5,
    )
    # A large image for a 32 px network is not cropped: the whole image is resized.
    whole = np.clip(augment.resize(tf.constant(big), 32, 32).numpy(), 0, 1)
    np.testing.assert_allclose(
        augment.preprocess_for_eval(tf.constant(big), height=32, width=32).numpy(), whole, atol=1e-6
    )
    # Size known only at run time: the same result.
    dynamic = tf.function(
        lambda x: augment.preprocess_for_eval(x, height=56, width=56),
        input_signature=[tf.TensorSpec([None, None, 3], tf.float32)],
    )
    np.testing.assert_allclose(dynamic(big).numpy(), big[4:60, 4:60], atol=1e-5)


def test_flip_only_gives_the_image_or_its_mirror():
    image = np.random.default_rng(4).random((8, 8, 3), dtype=np.float32)
    fn = functools.partial(
        augment.preprocess_for_train,
        height=8,
        width=8,
        color_jitter_strength=1.0,
        use_blur=False,
        crop=False,
        color_distort=False,
    )
    out = _over_seeds(lambda s: fn(tf.constant(image), s), 200).numpy()
    same = np.all(out == image, axis=(1, 2, 3))
    mirrored = np.all(out == image[:, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored)
    assert _binomial_ok(mirrored.sum(), 200, 0.5)


# ------------------------------------------------------------------------------------------------
# Colour.


@pytest.mark.parametrize("strength, value", [(0.5, 0.5), (1.5, 0.4)])
def test_brightness_factor_range(strength, value):
    image = tf.fill([4, 4, 3], value)
    jitter = functools.partial(augment.color_jitter, strength=strength, contrast=0.0, saturation=0.0, hue=0.0)
    ratio = _over_seeds(lambda s: jitter(image, s)[0, 0, 0], 500).numpy() / value
    low, high = max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength
    assert ratio.min() >= low - 1e-6 and ratio.max() <= high + 1e-6
    spread = high - low
    assert ratio.min() < low + 0.05 * spread and ratio.max() > high - 0.05 * spread


def test_color_jitter_on_single_channel_only_changes_brightness_and_contrast():
    image = tf.constant(np.random.default_rng(5).random((6, 6, 1), dtype=np.float32))
    only_chroma = augment.color_jitter(image, [3, 4], 1.0, brightness=0.0, contrast=0.0)
    np.testing.assert_array_equal(only_chroma.numpy(), image.numpy())
    out = augment.random_color_distortion(image, [3, 4], 1.0, p_jitter=1.0)
    assert out.shape == (6, 6, 1)
    assert not np.array_equal(out.numpy(), image.numpy())


def test_color_jitter_changes_colour_of_rgb():
    image = tf.constant(np.random.default_rng(6).random((6, 6, 3), dtype=np.float32))
    out = augment.color_jitter(image, [5, 6], 1.0, brightness=0.0, contrast=0.0).numpy()
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.abs(out - image.numpy()).max() > 1e-3


def test_color_jitter_order_is_random():
    image = tf.constant(np.random.default_rng(10).random((4, 4, 3), dtype=np.float32))
    shuffled = _over_seeds(lambda s: augment.color_jitter(image, s, 1.0), 200).numpy()
    fixed = _over_seeds(lambda s: augment.color_jitter(image, s, 1.0, random_order=False), 200).numpy()
    same = np.all(np.abs(shuffled - fixed) < 1e-6, axis=(1, 2, 3))
    # Same factors, so only the order differs: it is the fixed one in about 1 of 24 seeds (a few
    # more where the drawn order happens to commute), another one in the rest.
    assert 1 <= same.sum() <= 60


def _colourful():
    return tf.constant(np.random.default_rng(7).random((4, 4, 3), dtype=np.float32))


def test_grayscale_probability():
    image = _colourful()
    out = _over_seeds(lambda s: augment.random_color_distortion(image, s, 1.0, p_jitter=0.0), 2000).numpy()
    gray = np.all(np.ptp(out, axis=-1) < 1e-6, axis=(1, 2))
    assert _binomial_ok(gray.sum(), 2000, 0.2)
    # Gray outputs are the luma of the input (ITU-R 601 weights), tiled to all channels.
    luma = np.asarray(image) @ np.array([0.2989, 0.5870, 0.1140], np.float32)
    np.testing.assert_allclose(out[gray][..., 0], np.broadcast_to(luma, out[gray][..., 0].shape), atol=1e-3)


def test_jitter_probability():
    image = _colourful()
    out = _over_seeds(lambda s: augment.random_color_distortion(image, s, 1.0, p_gray=0.0), 2000).numpy()
    changed = np.any(np.abs(out - np.asarray(image)) > 1e-6, axis=(1, 2, 3))
    assert _binomial_ok(changed.sum(), 2000, 0.8)


# ------------------------------------------------------------------------------------------------
# Blur.


def _numpy_blur(image, sigma, kernel_size, mode):
    radius = kernel_size // 2
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    pad = [(radius, radius), (radius, radius), (0, 0)]
    padded = np.pad(image.astype(np.float64), pad, mode="constant" if mode == "SAME" else "reflect")
    h, w, _ = image.shape
    rows = sum(kernel[i] * padded[i : i + h] for i in range(kernel_size))
    return sum(kernel[j] * rows[:, j : j + w] for j in range(kernel_size))


@pytest.mark.parametrize("padding", ["SAME", "REFLECT"])
def test_gaussian_blur_matches_numpy(padding):
    image = np.random.default_rng(8).random((9, 11, 2), dtype=np.float32)
    out = augment.gaussian_blur(tf.constant(image), 1.3, 5, padding=padding).numpy()
    np.testing.assert_allclose(out, _numpy_blur(image, 1.3, 5, padding), atol=1e-5)


def test_blur_kernel_size_follows_official_radius():
    # radius = height // 20, size = 2 * radius + 1.
    assert augment.blur_kernel_size(224) == 23
    assert augment.blur_kernel_size(32) == 3
    assert augment.blur_kernel_size(28) == 3
    assert augment.blur_kernel_size(96) == 9


def test_random_blur_probability():
    image = _colourful()
    out = _over_seeds(lambda s: augment.random_blur(image, s, height=40), 1000).numpy()
    blurred = np.any(np.abs(out - np.asarray(image)) > 1e-6, axis=(1, 2, 3))
    assert _binomial_ok(blurred.sum(), 1000, 0.5)


# ------------------------------------------------------------------------------------------------
# Determinism.


def test_preprocess_for_train_same_eagerly_and_in_tf_data():
    image = tf.constant(np.random.default_rng(9).random((40, 40, 3), dtype=np.float32))
    fn = functools.partial(
        augment.preprocess_for_train, height=24, width=24, color_jitter_strength=1.0, use_blur=True
    )
    seeds = tf.constant([[0, 1], [2, 3], [7, 11], [123, 456]], tf.int64)
    eager = np.stack([fn(image, s).numpy() for s in seeds])
    mapped = next(
        iter(
            tf.data.Dataset.from_tensor_slices(seeds)
            .map(lambda s: fn(image, s), num_parallel_calls=2, deterministic=True)
            .batch(4)
        )
    ).numpy()
    np.testing.assert_array_equal(eager, mapped)
    assert eager.shape == (4, 24, 24, 3)
    assert not np.array_equal(eager[0], eager[1])
    # int32 and int64 seeds with the same values agree.
    np.testing.assert_array_equal(fn(image, tf.constant([7, 11], tf.int32)).numpy(), eager[2])
