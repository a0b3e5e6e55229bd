"""SimCLR augmentations in pure JAX, batched, for use inside a jitted train step on the accelerator.

Mirrors ``augment.py`` (the TensorFlow ops of the host pipeline) op by op: the crop sampler (TF's
``sample_distorted_bounding_box`` with the whole image as the only box, integer arithmetic included),
bicubic resize (TF2 ``tf.image.resize(..., BICUBIC)``: half-pixel Keys cubic with TF's 1024-entry
coefficient table), flip, colour jitter (multiplicative brightness, contrast, saturation, hue in a
per-example random order, clipped after each op), grayscale, zero-padded Gaussian blur, and the same
probabilities. Images are ``[B, H, W, C]`` float32 in [0, 1] (uint8 is divided by 255); all functions
are batched, jit-compatible and keep static shapes. With the random parameters fixed the pixels
match TF's to float rounding (~1e-6). Where it differs, knowingly:

* the random numbers come from ``jax.random`` (one sub-key per op, so turning blur on does not move
  the crops), not TF's stateless Philox seeds: same distributions, different draws for a seed;
* all crop attempts are drawn at once and the first valid one is kept (same law as TF's loop);
  TF's quirk that the offset is ``Uniform(H - h)`` (a partial crop never touches the last row or
  column) is kept;
* every op runs on the whole batch and ``where`` picks per example; the resize is two matmuls at
  ``Precision.HIGHEST`` (so TF32/bf16 passes on accelerators do not degrade it);
* contrast, hue, flips and HSV -> RGB are dm-pix's ops (they match TF's to the tests' tolerance);
  saturation keeps its own HSV round trip, which reproduces TF's saturation kernel where dm-pix does
  not (pixels whose hue rounds to exactly 1.0, and near-black pixels); grayscale and blur stay
  hand-written too (dm-pix's run at default matmul precision, and its blur takes one sigma per call);
* uint8 / 255 may differ from TF's by an ulp; the crop-size arithmetic is exact for images under
  ~3000 px.
"""

from __future__ import annotations

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from simclrv2_jax.data import views
from simclrv2_jax.data.views import CROP_PROPORTION, SMALL_IMAGE_SIZE, blur_kernel_size

_TABLE = 1024  # TF's bicubic coefficient table size (ResizeBicubic, kTableSize).
_GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale.
_HIGHEST = lax.Precision.HIGHEST


def _keys_cubic_table(a: float = -0.5) -> np.ndarray:
    # Column 0: weight of the two nearer taps at distance x, column 1: of the two farther at x + 1.
    x = np.arange(_TABLE + 1, dtype=np.float64) / _TABLE
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    x1 = x + 1.0
    far = ((a * x1 - 5 * a) * x1 + 8 * a) * x1 - 4 * a
    return np.stack([near, far], -1).astype(np.float32)


_COEFFS = _keys_cubic_table()


def _lrint(x: jax.Array) -> jax.Array:
    return jnp.round(x).astype(jnp.int32)  # Round half to even, as lrintf.


def _per_example(factor: jax.Array) -> jax.Array:
    return jnp.asarray(factor, jnp.float32).reshape(-1, 1, 1, 1)


def _to_float(images) -> jax.Array:
    images = jnp.asarray(images)
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# Crops, resizes and flips.


def _max_height_for_width(img_w: int, ratio: jax.Array) -> jax.Array:
    """TF's ``int((W + 0.5 - kEps) / ratio)`` (computed in double there), exactly in float32.

    ``n`` qualifies iff ``n * ratio <= W + 0.5 - kEps``; the product is split into two exact halves
    (``ratio`` = 12 high + 12 low mantissa bits, ``n < 4096``), so the test is exact.
    """
    bound = np.float32(img_w + 0.5)
    r_hi = lax.bitcast_convert_type(
        lax.bitcast_convert_type(ratio, jnp.uint32) & np.uint32(0xFFFFF000), jnp.float32
    )
    r_lo = ratio - r_hi

    def fits(n):
        nf = n.astype(jnp.float32)
        return (bound - nf * r_hi) - nf * r_lo >= np.float32(1e-7)

    n = jnp.floor(bound / ratio).astype(jnp.int32)
    n = jnp.where(fits(n), n, n - 1)
    return jnp.where(fits(n + 1), n + 1, n)


def sample_crop_boxes(
    key,
    num: int,
    image_hw,
    *,
    area_range=views.CROP_AREA_RANGE,
    aspect_ratio_range=views.CROP_ASPECT_RANGE,
    max_attempts: int = views.CROP_MAX_ATTEMPTS,
    target_aspect: float = 1.0,
    min_object_covered: float = views.CROP_MIN_COVERED,
) -> tuple[jax.Array, jax.Array]:
    """Inception-style crop boxes as ``augment.sample_crop_box``: ``(offsets [num, 2] (y, x), sizes
    [num, 2] (h, w))`` int32, for ``num`` independent draws on an image of static size ``image_hw``.

    TF's ``GenerateRandomCrop`` step by step (float32 like TF): aspect ratio ~ U(range) (scaled by
    ``target_aspect``), height uniform between the lrint-rounded heights of the minimum and maximum
    area (the latter capped so the width fits), width = lrint(height * ratio), one +1 / -1 height retry
    when rounding leaves the area range, rejection outside the area range or the image, then TF's
    overlap check with the whole image (area / image area >= ``min_object_covered``). The first
    valid of ``max_attempts`` attempts wins; if none is, the whole image.
    """
    img_h, img_w = (int(s) for s in image_hw)
    f32 = np.float32
    lo = f32(aspect_ratio_range[0] * target_aspect)
    hi = f32(aspect_ratio_range[1] * target_aspect)
    min_rel, max_rel = f32(area_range[0]), f32(area_range[1])
    min_area = min_rel * f32(img_w) * f32(img_h)
    max_area = max_rel * f32(img_w) * f32(img_h)
    whole_offsets = jnp.zeros((num, 2), jnp.int32)
    whole_sizes = jnp.broadcast_to(jnp.array([img_h, img_w], jnp.int32), (num, 2))
    if max_rel <= 0 or min_rel > max_rel or lo <= 0:
        return whole_offsets, whole_sizes

    k_ratio, k_h, k_y, k_x = jax.random.split(key, 4)
    shape = (num, max_attempts)
    ratio = jax.random.uniform(k_ratio, shape, jnp.float32) * (hi - lo) + lo
    h_min = _lrint(jnp.sqrt(min_area / ratio))
    h_max = _lrint(jnp.sqrt(max_area / ratio))
    capped = _max_height_for_width(img_w, ratio)
    capped = jnp.where(_lrint(capped * ratio) > img_w, capped - 1, capped)
    h_max = jnp.where(_lrint(h_max * ratio) > img_w, capped, h_max)
    h_max = jnp.minimum(h_max, img_h)
    h_min = jnp.minimum(h_min, h_max)
    height = jax.random.randint(k_h, shape, h_min, h_max + 1)
    width = _lrint(height * ratio)
    area = (width * height).astype(jnp.float32)
    for step, bad in ((1, lambda a: a < min_area), (-1, lambda a: a > max_area)):
        retry = bad(area)  # One retry each way when rounding left the area range.
        height = jnp.where(retry, height + step, height)
        width = jnp.where(retry, _lrint(height * ratio), width)
        area = (width * height).astype(jnp.float32)
    valid = (area >= min_area) & (area <= max_area) & (width > 0) & (height > 0)
    valid &= (width <= img_w) & (height <= img_h) & (area >= 1.0)
    valid &= area / f32(img_w * img_h) >= f32(min_object_covered)
    y = jax.random.randint(k_y, shape, 0, jnp.maximum(img_h - height, 1))
    x = jax.random.randint(k_x, shape, 0, jnp.maximum(img_w - width, 1))

    first = jnp.argmax(valid, axis=1)[:, None]
    found = jnp.any(valid, axis=1)[:, None]

    def pick(a):
        return jnp.take_along_axis(a, first, axis=1)[:, 0]

    offsets = jnp.stack([pick(y), pick(x)], -1)
    sizes = jnp.stack([pick(height), pick(width)], -1)
    return jnp.where(found, offsets, whole_offsets), jnp.where(found, sizes, whole_sizes)


def _resize_matrix(offset: jax.Array, size: jax.Array, in_len: int, out_len: int) -> jax.Array:
    """``[B, out_len, in_len]`` weights of TF's half-pixel Keys-cubic resampling of the window
    ``[offset, offset + size)`` (TF's 1024-entry table, out-of-window taps zeroed, renormalised)."""
    scale = size.astype(jnp.float32) / np.float32(out_len)
    loc = (jnp.arange(out_len, dtype=jnp.float32) + 0.5)[None] * scale[:, None] - 0.5
    base = jnp.floor(loc)
    q = _lrint((loc - base) * _TABLE)
    table = jnp.asarray(_COEFFS)
    coef = jnp.stack([table[q, 1], table[q, 0], table[_TABLE - q, 0], table[_TABLE - q, 1]], -1)
    idx = base.astype(jnp.int32)[..., None] + jnp.arange(-1, 3)
    size = size[:, None, None]
    weight = jnp.where((idx >= 0) & (idx < size), coef, 0.0)
    total = ((weight[..., 0] + weight[..., 1]) + weight[..., 2]) + weight[..., 3]
    ok = jnp.abs(total) >= 1000.0 * np.finfo(np.float32).tiny
    weight = jnp.where(ok[..., None], weight * (1.0 / jnp.where(ok, total, 1.0))[..., None], weight)
    src = jnp.clip(idx, 0, size - 1) + offset[:, None, None]
    positions = jnp.arange(in_len)
    return sum(jnp.where(src[..., t, None] == positions, weight[..., t, None], 0.0) for t in range(4))


def crop_and_resize(images, offsets, sizes, height: int, width: int) -> jax.Array:
    """Crops box ``[offsets, offsets + sizes)`` of each image and resizes it bicubically to
    ``(height, width)`` as TF2 ``tf.image.resize(crop, method=BICUBIC)``, then clips to [0, 1].
    ``offsets`` / ``sizes`` are int ``[B, 2]`` (y, x) / (h, w) and may be traced."""
    images = _to_float(images)
    _, in_h, in_w, _ = images.shape
    offsets = jnp.asarray(offsets, jnp.int32)
    sizes = jnp.asarray(sizes, jnp.int32)
    wy = _resize_matrix(offsets[:, 0], sizes[:, 0], in_h, height)
    wx = _resize_matrix(offsets[:, 1], sizes[:, 1], in_w, width)
    rows = jnp.einsum("byh,bhwc->bywc", wy, images, precision=_HIGHEST)
    out = jnp.einsum("bxw,bywc->byxc", wx, rows, precision=_HIGHEST)
    return jnp.clip(out, 0.0, 1.0)


def resize(images, height: int, width: int) -> jax.Array:
    """Plain bicubic resize + clip (``augment._resize``); the input itself when the size matches."""
    images = _to_float(images)
    b, in_h, in_w, _ = images.shape
    if (in_h, in_w) == (height, width):
        return images
    offsets = jnp.zeros((b, 2), jnp.int32)
    sizes = jnp.broadcast_to(jnp.array([in_h, in_w], jnp.int32), (b, 2))
    return crop_and_resize(images, offsets, sizes, height, width)


def center_crop_and_resize(images, height: int, width: int, crop_proportion: float = CROP_PROPORTION):
    """``augment.center_crop`` for a static image size: aspect-preserving centre crop + resize."""
    images = _to_float(images)
    in_h, in_w = images.shape[1:3]
    f32 = np.float32
    aspect, share = width / height, f32(crop_proportion)
    image_h, image_w = f32(in_h), f32(in_w)
    if f32(aspect) > image_w / image_h:  # The width limits the crop.
        crop = (f32(crop_proportion / aspect) * image_w, share * image_w)
    else:
        crop = (share * image_h, f32(crop_proportion * aspect) * image_h)
    crop_h, crop_w = (int(np.rint(c)) for c in crop)  # tf.math.rint: half to even.
    top, left = (in_h - crop_h + 1) // 2, (in_w - crop_w + 1) // 2
    return jnp.clip(resize(images[:, top : top + crop_h, left : left + crop_w], height, width), 0.0, 1.0)


def flip_left_right(images, flags) -> jax.Array:
    """Mirrors the examples whose ``flags`` (bool ``[B]``) are set."""
    images = jnp.asarray(images)
    return _select(flags, pix.flip_left_right(images), images)


# ------------------------------------------------------------------------------------------------
# Colour. Factors are per example, shape [B].


def adjust_brightness(x, factor) -> jax.Array:
    """Multiplicative brightness (SimCLRv2 ``impl``), no clip."""
    return x * _per_example(factor)


def adjust_contrast(x, factor) -> jax.Array:
    """``tf.image.adjust_contrast`` (dm-pix): per image and channel, ``(x - mean) * factor + mean``."""
    return pix.adjust_contrast(x, _per_example(factor))


def rgb_to_hsv(x) -> jax.Array:
    """RGB -> HSV with hue in [0, 1), as TF's AdjustSaturation kernel computes it."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = jnp.maximum(r, jnp.maximum(g, b))
    chroma = v - jnp.minimum(r, jnp.minimum(g, b))
    s = jnp.where(v > 0, chroma / jnp.where(v > 0, v, 1.0), 0.0)
    norm = 1.0 / (6.0 * jnp.where(chroma > 0, chroma, 1.0))
    h = jnp.where(
        r == v, norm * (g - b), jnp.where(g == v, norm * (b - r) + 2.0 / 6.0, norm * (r - g) + 4.0 / 6.0)
    )
    h = jnp.where(chroma > 0, h, 0.0)
    h = jnp.where(h < 0, h + 1.0, h)
    return jnp.stack([h, s, v], -1)


def _hsv6_to_rgb(h6, s, v) -> jax.Array:
    # TF's hsv_to_rgb with the hue in sixths of a turn: category 6 (hue 1.0) is TF's grey default.
    c = s * v
    m = v - c
    ramp = c * (1.0 - jnp.abs(jnp.mod(h6, 2.0) - 1.0))
    zero = jnp.zeros_like(c)
    conds = [jnp.trunc(h6) == k for k in range(6)]
    r = jnp.select(conds, [c, ramp, zero, zero, ramp, c], zero)
    g = jnp.select(conds, [ramp, c, c, ramp, zero, zero], zero)
    b = jnp.select(conds, [zero, zero, ramp, c, c, ramp], zero)
    return jnp.stack([r + m, g + m, b + m], -1)


def hsv_to_rgb(x) -> jax.Array:
    """``tf.image.hsv_to_rgb`` (dm-pix), the inverse of ``rgb_to_hsv``."""
    return pix.hsv_to_rgb(x)


def adjust_saturation(x, factor) -> jax.Array:
    """``tf.image.adjust_saturation``: saturation scaled and clamped to [0, 1] (RGB input)."""
    hsv = rgb_to_hsv(x)
    s = jnp.clip(hsv[..., 1] * _per_example(factor)[..., 0], 0.0, 1.0)
    return _hsv6_to_rgb(hsv[..., 0] * 6.0, s, hsv[..., 2])


def adjust_hue(x, delta) -> jax.Array:
    """``tf.image.adjust_hue`` (dm-pix): hue rotated by ``delta`` (fraction of a turn), RGB input."""
    return pix.adjust_hue(x, _per_example(delta)[..., 0])


def to_grayscale(x) -> jax.Array:
    """Luma with ``tf.image.rgb_to_grayscale`` weights, tiled back to C channels."""
    channels = x.shape[-1]
    if channels == 1:
        return x
    if channels != 3:
        raise ValueError(f"Grayscale needs 1 or 3 channels, got {channels}.")
    w0, w1, w2 = _GRAY_WEIGHTS
    gray = x[..., 0:1] * w0 + x[..., 1:2] * w1 + x[..., 2:3] * w2
    return jnp.broadcast_to(gray, x.shape)


def sample_color_jitter(key, num: int, strength: float) -> dict[str, jax.Array]:
    """Per-example jitter parameters as ``augment.color_jitter`` draws them: ``brightness``,
    ``contrast``, ``saturation`` factors ~ U[max(0, 1 - 0.8s), 1 + 0.8s], ``hue`` ~ U[-0.2s, 0.2s]
    (all ``[num]``) and ``order`` ``[num, 4]``, a uniform random permutation of the four ops."""
    keys = jax.random.split(key, 5)
    b, c, s, h = (a * strength for a in views.JITTER_AMOUNTS)

    def uniform(k, low, high):
        return jax.random.uniform(k, (num,), jnp.float32, low, high)

    return {
        "brightness": uniform(keys[0], max(0.0, 1.0 - b), 1.0 + b),
        "contrast": uniform(keys[1], max(0.0, 1.0 - c), 1.0 + c),
        "saturation": uniform(keys[2], max(0.0, 1.0 - s), 1.0 + s),
        "hue": uniform(keys[3], -h, h),
        "order": jnp.argsort(jax.random.uniform(keys[4], (num, 4)), axis=-1),
    }


def color_jitter(images, key, strength: float, random_order: bool = True) -> jax.Array:
    """SimCLRv2 colour jitter (``augment.color_jitter``) with per-example factors and order; each op
    is followed by a clip to [0, 1]; saturation and hue are no-ops unless C == 3."""
    if strength < 0:
        raise ValueError(f"The colour jitter strength must be >= 0, got {strength}.")
    x = _to_float(images)
    if strength == 0:
        return x
    num = x.shape[0]
    p = sample_color_jitter(key, num, strength)
    ops = [lambda y: adjust_brightness(y, p["brightness"]), lambda y: adjust_contrast(y, p["contrast"])]
    if x.shape[-1] == 3:
        ops += [lambda y: adjust_saturation(y, p["saturation"]), lambda y: adjust_hue(y, p["hue"])]
    order = p["order"] if random_order else jnp.broadcast_to(jnp.arange(4), (num, 4))

    def slot(i, y):  # Every example applies its own op of slot i (op indices >= len(ops): none).
        which = order[:, i].reshape(-1, 1, 1, 1)
        out = y
        for op_index, op in enumerate(ops):
            out = jnp.where(which == op_index, jnp.clip(op(y), 0.0, 1.0), out)
        return out

    return lax.fori_loop(0, 4, slot, x)


def _coin(key, num: int, p: float) -> jax.Array:
    return jax.random.uniform(key, (num,)) < p


def _select(flags, if_true, if_false) -> jax.Array:
    return jnp.where(jnp.asarray(flags).reshape(-1, 1, 1, 1), if_true, if_false)


def random_color_distortion(
    images,
    key,
    strength: float,
    p_jitter: float = views.JITTER_PROBABILITY,
    p_gray: float = views.GRAYSCALE_PROBABILITY,
):
    """Jitter with probability ``p_jitter``, then grayscale with ``p_gray`` (independent coins)."""
    x = _to_float(images)
    num = x.shape[0]
    k_jitter_coin, k_jitter, k_gray_coin = jax.random.split(key, 3)
    if p_jitter > 0:
        jittered = color_jitter(x, k_jitter, strength)
        x = jittered if p_jitter >= 1 else _select(_coin(k_jitter_coin, num, p_jitter), jittered, x)
    if p_gray > 0:
        gray = to_grayscale(x)
        x = gray if p_gray >= 1 else _select(_coin(k_gray_coin, num, p_gray), gray, x)
    return x


# ------------------------------------------------------------------------------------------------
# Blur.


def gaussian_blur(images, sigmas, kernel_size: int) -> jax.Array:
    """Separable Gaussian blur with per-example ``sigmas`` ``[B]``, ``2 * (kernel_size // 2) + 1``
    normalised taps, zero ('SAME') padding, each channel on its own (``augment.gaussian_blur``)."""
    x = _to_float(images)
    radius = kernel_size // 2
    if radius == 0:
        return x
    taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    sigma = jnp.asarray(sigmas, jnp.float32).reshape(-1, 1)
    kernel = jnp.exp(-jnp.square(taps) / (2.0 * jnp.square(sigma)))
    kernel = kernel / jnp.sum(kernel, axis=-1, keepdims=True)
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        padded = jnp.pad(x, pad)
        n = x.shape[axis]
        x = sum(
            _per_example(kernel[:, i]) * lax.slice_in_dim(padded, i, i + n, axis=axis)
            for i in range(2 * radius + 1)
        )
    return x


def random_blur(images, key, height: int, p: float = views.BLUR_PROBABILITY) -> jax.Array:
    """Blur with probability ``p`` per example, sigma ~ U(0.1, 2.0) (``augment.random_blur``)."""
    x = _to_float(images)
    if p <= 0:
        return x
    k_coin, k_sigma = jax.random.split(key)
    sigma = jax.random.uniform(k_sigma, (x.shape[0],), jnp.float32, *views.BLUR_SIGMA_RANGE)
    blurred = gaussian_blur(x, sigma, blur_kernel_size(height))
    return blurred if p >= 1 else _select(_coin(k_coin, x.shape[0], p), blurred, x)


# ------------------------------------------------------------------------------------------------
# Whole pipelines.


def preprocess_for_train(
    images,
    key,
    *,
    height: int,
    width: int,
    color_jitter_strength: float,
    use_blur: bool,
    crop: bool = True,
    flip: bool = True,
    color_distort: bool = True,
    crop_min_area: float = views.CROP_AREA_RANGE[0],
) -> jax.Array:
    """One augmented view per example (``augment.preprocess_for_train``): crop + resize, flip with
    p = 0.5, colour distortion, blur, final clip. Four sub-keys whatever the switches."""
    x = _to_float(images)
    num, in_h, in_w, _ = x.shape
    k_crop, k_flip, k_color, k_blur = jax.random.split(key, 4)
    if crop:
        offsets, sizes = sample_crop_boxes(
            k_crop, num, (in_h, in_w), target_aspect=width / height, area_range=(crop_min_area, 1.0)
        )
        x = crop_and_resize(x, offsets, sizes, height, width)
    else:
        x = resize(x, height, width)
    if flip:
        x = flip_left_right(x, _coin(k_flip, num, views.FLIP_PROBABILITY))
    if color_distort:
        x = random_color_distortion(x, k_color, color_jitter_strength)
    if use_blur:
        x = random_blur(x, k_blur, height)
    return jnp.clip(x, 0.0, 1.0)


def preprocess_for_eval(images, *, height: int, width: int, crop: bool = True) -> jax.Array:
    """Evaluation view (``augment.preprocess_for_eval``): 87.5% centre crop + bicubic resize, the
    crop skipped when the target is at most 32 px (then only resized when the size differs)."""
    x = _to_float(images)
    if crop and max(height, width) > SMALL_IMAGE_SIZE:
        x = center_crop_and_resize(x, height, width)
    else:
        x = resize(x, height, width)
    return jnp.clip(x, 0.0, 1.0)
