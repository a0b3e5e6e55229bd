"""SimCLR image augmentations as TensorFlow ops.

Images are float32 ``[H, W, C]`` in ``[0, 1]`` (no mean/std normalisation, as in the official
release). Every random choice is *stateless*: it is a pure function of an explicit ``seed`` tensor of
shape ``[2]`` (int32 or int64). The same seed therefore gives the same pixels eagerly and inside
``tf.data.Dataset.map``, whatever the iteration order, which is what lets a resumed input pipeline
reproduce the exact batches of an uninterrupted one. Each op consumes its own sub-seed obtained with
``tf.random.experimental.stateless_split``; the number of sub-seeds never depends on which ops are
switched on, so turning blur on does not change the crops of the same seed.

The ops follow the authors' public release (``data_util.py`` of google-research/simclr, TF2 and TF1
"simclrv2" code path); each docstring says where it deviates, if anywhere.
"""

from collections.abc import Sequence

from simclrv2_jax.data import views
from simclrv2_jax.data.tf_cpu import tf
from simclrv2_jax.data.views import CROP_PROPORTION, SMALL_IMAGE_SIZE, blur_kernel_size


def _as_seed(seed) -> tf.Tensor:
    # int64 throughout so that a seed built as int32 in one place and int64 in another still gives
    # the same stream of sub-seeds.
    return tf.cast(tf.convert_to_tensor(seed), tf.int64)


def _split(seed, num: int) -> tf.Tensor:
    return tf.random.experimental.stateless_split(_as_seed(seed), num=num)


def _uniform(seed, minval, maxval) -> tf.Tensor:
    return tf.random.stateless_uniform([], seed=seed, minval=minval, maxval=maxval, dtype=tf.float32)


def _num_channels(image: tf.Tensor) -> int:
    channels = image.shape[-1]
    if channels is None:
        raise ValueError("The channel dimension of the image must be known statically.")
    return int(channels)


def _random_apply(fn, image: tf.Tensor, seed, p: float) -> tf.Tensor:
    if p <= 0.0:
        return image
    if p >= 1.0:
        return fn(image)
    return tf.cond(_uniform(seed, 0.0, 1.0) < p, lambda: fn(image), lambda: image)


def resize(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """Bicubic resize to ``(height, width)``, clipped to [0, 1]."""
    # Plain bicubic without antialiasing, as tf.image.resize is called in the official code; bicubic
    # overshoots, hence the clip.
    image = tf.image.resize(image, [height, width], method=tf.image.ResizeMethod.BICUBIC)
    return tf.clip_by_value(image, 0.0, 1.0)


# ------------------------------------------------------------------------------------------------
# Crops and flips.


def sample_crop_box(
    image_shape,
    seed,
    *,
    area_range=views.CROP_AREA_RANGE,
    aspect_ratio_range=views.CROP_ASPECT_RANGE,
    max_attempts: int = views.CROP_MAX_ATTEMPTS,
    target_aspect: float = 1.0,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Samples the Inception-style crop box; returns ``(offset_yx, size_hw)`` int32 tensors.

    Official ``distorted_bounding_box_crop``: the whole image is the only bounding box, with
    ``min_object_covered=0.1`` (so in practice the area is at least 10% of the image), the aspect
    ratio range is scaled by the target width/height, and after ``max_attempts`` failures the op
    returns the whole image (``use_image_if_no_bounding_boxes``).
    """
    whole_image = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4])
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_size=image_shape,
        bounding_boxes=whole_image,
        seed=_as_seed(seed),
        min_object_covered=views.CROP_MIN_COVERED,
        aspect_ratio_range=(aspect_ratio_range[0] * target_aspect, aspect_ratio_range[1] * target_aspect),
        area_range=area_range,
        max_attempts=max_attempts,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.cast(begin[:2], tf.int32), tf.cast(size[:2], tf.int32)


def random_resized_crop(
    image: tf.Tensor,
    seed,
    height: int,
    width: int,
    area_range=views.CROP_AREA_RANGE,
    aspect_ratio_range=views.CROP_ASPECT_RANGE,
    max_attempts: int = views.CROP_MAX_ATTEMPTS,
) -> tf.Tensor:
    """Random area/aspect crop, then bicubic resize to ``(height, width)`` and clip to [0, 1].

    Official ``crop_and_resize`` (``random_crop_with_resize`` with p=1): see ``sample_crop_box``.
    """
    offset, size = sample_crop_box(
        tf.shape(image),
        seed,
        area_range=area_range,
        aspect_ratio_range=aspect_ratio_range,
        max_attempts=max_attempts,
        target_aspect=width / height,
    )
    crop = tf.slice(image, tf.concat([offset, [0]], 0), tf.concat([size, [-1]], 0))
    crop.set_shape([None, None, image.shape[-1]])  # Later ops need the channel count statically.
    return resize(crop, height, width)


def random_flip(image: tf.Tensor, seed) -> tf.Tensor:
    """Horizontal flip with p = 0.5 (official ``tf.image.random_flip_left_right``)."""
    return tf.image.stateless_random_flip_left_right(image, seed=_as_seed(seed))


def center_crop(
    image: tf.Tensor, height: int, width: int, crop_proportion: float = CROP_PROPORTION
) -> tf.Tensor:
    """Aspect-preserving centre crop of ``crop_proportion``, then bicubic resize (official).

    As the official ``_compute_crop_shape``: the crop has the target aspect ratio ``width/height``
    and covers ``crop_proportion`` of the image along the side that limits it.
    """
    shape = tf.shape(image)
    image_h = tf.cast(shape[0], tf.float32)
    image_w = tf.cast(shape[1], tf.float32)
    aspect = width / height

    def _limited_by_width():
        return (tf.math.rint(crop_proportion / aspect * image_w), tf.math.rint(crop_proportion * image_w))

    def _limited_by_height():
        return (tf.math.rint(crop_proportion * image_h), tf.math.rint(crop_proportion * aspect * image_h))

    crop_h, crop_w = tf.cond(aspect > image_w / image_h, _limited_by_width, _limited_by_height)
    crop_h = tf.cast(crop_h, tf.int32)
    crop_w = tf.cast(crop_w, tf.int32)
    offset_h = (shape[0] - crop_h + 1) // 2
    offset_w = (shape[1] - crop_w + 1) // 2
    crop = tf.image.crop_to_bounding_box(image, offset_h, offset_w, crop_h, crop_w)
    return resize(crop, height, width)


# ------------------------------------------------------------------------------------------------
# Colour.


def to_grayscale(image: tf.Tensor) -> tf.Tensor:
    """Luma grayscale tiled back to C channels (official ``to_grayscale(keep_channels=True)``)."""
    if _num_channels(image) == 1:
        return image
    return tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, _num_channels(image)])


def color_jitter(
    image: tf.Tensor,
    seed,
    strength: float,
    random_order: bool = True,
    *,
    brightness: float | None = None,
    contrast: float | None = None,
    saturation: float | None = None,
    hue: float | None = None,
) -> tf.Tensor:
    """SimCLR colour jitter; the per-component amounts default to 0.8s, 0.8s, 0.8s, 0.2s.

    Follows the official ``color_jitter`` with ``impl='simclrv2'``:
      * brightness is *multiplicative*, factor ~ U[max(0, 1 - b), 1 + b];
      * contrast (per-channel spatial mean kept) factor ~ U[1 - c, 1 + c];
      * saturation factor ~ U[1 - s, 1 + s], hue delta ~ U[-h, h];
      * the four in a random order (``random_order``), clipped to [0, 1] after each one.
    Deviation: contrast and saturation lower bounds are clamped at 0 so strengths above 1.25 do not
    invert the image (the official code raises there). For C == 1 saturation and hue are no-ops:
    a single-channel image has no chroma to change.
    """
    given = (brightness, contrast, saturation, hue)
    amounts = [a * strength if g is None else g for a, g in zip(views.JITTER_AMOUNTS, given)]
    if any(a < 0 for a in amounts):
        raise ValueError(f"Colour jitter amounts must be >= 0, got {amounts}.")
    is_rgb = _num_channels(image) == 3
    seeds = _split(seed, 5)
    b, c, s, h = amounts
    # Factors are drawn up front, tied to the op rather than to its slot in the order.
    b_factor = _uniform(seeds[0], max(0.0, 1.0 - b), 1.0 + b)
    c_factor = _uniform(seeds[1], max(0.0, 1.0 - c), 1.0 + c)
    s_factor = _uniform(seeds[2], max(0.0, 1.0 - s), 1.0 + s)
    h_delta = _uniform(seeds[3], -h, h)

    def clip(x):
        return tf.clip_by_value(x, 0.0, 1.0)

    transforms = [
        lambda x: clip(x * b_factor) if b > 0 else x,
        lambda x: clip(tf.image.adjust_contrast(x, c_factor)) if c > 0 else x,
        lambda x: clip(tf.image.adjust_saturation(x, s_factor)) if s > 0 and is_rgb else x,
        lambda x: clip(tf.image.adjust_hue(x, h_delta)) if h > 0 and is_rgb else x,
    ]
    if not random_order:
        for fn in transforms:
            image = fn(image)
        return image
    order = tf.argsort(tf.random.stateless_uniform([4], seed=seeds[4]))
    for slot in range(4):
        # Bind `image` now: each branch must see the output of the previous slot.
        image = tf.switch_case(order[slot], [lambda fn=fn, x=image: fn(x) for fn in transforms])
    return image


def random_color_distortion(
    image: tf.Tensor,
    seed,
    strength: float,
    p_jitter: float = views.JITTER_PROBABILITY,
    p_gray: float = views.GRAYSCALE_PROBABILITY,
) -> tf.Tensor:
    """Colour jitter with p = 0.8, then grayscale with p = 0.2 (official ``random_color_jitter``
    with ``impl='simclrv2'``; the two coins are independent)."""
    seeds = _split(seed, 3)
    image = _random_apply(lambda x: color_jitter(x, seeds[1], strength), image, seeds[0], p_jitter)
    return _random_apply(to_grayscale, image, seeds[2], p_gray)


# ------------------------------------------------------------------------------------------------
# Blur.


def gaussian_kernel_1d(sigma, kernel_size: int) -> tf.Tensor:
    """Normalised 1-D Gaussian of ``2 * (kernel_size // 2) + 1`` taps (official sizing)."""
    radius = kernel_size // 2
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-tf.square(x) / (2.0 * tf.square(tf.cast(sigma, tf.float32))))
    return kernel / tf.reduce_sum(kernel)


def gaussian_blur(image: tf.Tensor, sigma, kernel_size: int, padding: str = "SAME") -> tf.Tensor:
    """Separable Gaussian blur of an ``[H, W, C]`` image, each channel on its own.

    ``padding='SAME'`` pads with zeros, which is what the official depthwise convolution does (it
    darkens borders slightly); ``'REFLECT'`` mirrors the image instead (needs radius < H, W).
    """
    padding = padding.upper()
    if padding not in ("SAME", "REFLECT"):
        raise ValueError(f"padding must be 'SAME' or 'REFLECT', got {padding!r}.")
    radius = kernel_size // 2
    if radius == 0:
        return image
    channels = _num_channels(image)
    kernel = gaussian_kernel_1d(sigma, kernel_size)
    kernel_v = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
    kernel_h = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, channels, 1])
    x = image[tf.newaxis]
    conv_padding = padding
    if padding == "REFLECT":
        x = tf.pad(x, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
        conv_padding = "VALID"
    x = tf.nn.depthwise_conv2d(x, kernel_v, strides=[1, 1, 1, 1], padding=conv_padding)
    x = tf.nn.depthwise_conv2d(x, kernel_h, strides=[1, 1, 1, 1], padding=conv_padding)
    return x[0]


def random_blur(
    image: tf.Tensor, seed, height: int, p: float = views.BLUR_PROBABILITY, padding: str = "SAME"
) -> tf.Tensor:
    """Blur with probability p, sigma ~ U(0.1, 2.0) (official ``random_blur``; the official
    pretraining applies it per example to each view, as ``batch_random_blur`` does)."""
    seeds = _split(seed, 2)
    sigma = _uniform(seeds[1], *views.BLUR_SIGMA_RANGE)
    return _random_apply(
        lambda x: gaussian_blur(x, sigma, blur_kernel_size(height), padding), image, seeds[0], p
    )


# ------------------------------------------------------------------------------------------------
# Whole pipelines.


def _static_hw(image: tf.Tensor) -> Sequence[int | None]:
    return image.shape[0], image.shape[1]


def _resize_if_needed(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
    if tuple(_static_hw(image)) == (height, width):
        return image
    return resize(image, height, width)


def preprocess_for_train(
    image: tf.Tensor,
    seed,
    *,
    height: int,
    width: int,
    color_jitter_strength: float,
    use_blur: bool,
    crop: bool = True,
    flip: bool = True,
    color_distort: bool = True,
    crop_min_area: float = views.CROP_AREA_RANGE[0],
) -> tf.Tensor:
    """One augmented view: crop, flip, colour distortion, blur (official ``preprocess_for_train``
    plus the per-view blur that official pretraining adds with ``use_blur``).

    Fine-tuning and distillation call it with ``color_distort=False, use_blur=False`` (crop + flip).
    Without ``crop`` the image is only resized to ``(height, width)`` when its size differs;
    ``crop_min_area`` is the smallest fraction of the image a crop covers.
    """
    seeds = _split(seed, 4)
    image = tf.convert_to_tensor(image, tf.float32)
    if crop:
        image = random_resized_crop(image, seeds[0], height, width, area_range=(crop_min_area, 1.0))
    else:
        image = _resize_if_needed(image, height, width)
    if flip:
        image = random_flip(image, seeds[1])
    if color_distort:
        image = random_color_distortion(image, seeds[2], color_jitter_strength)
    if use_blur:
        image = random_blur(image, seeds[3], height)
    image = tf.clip_by_value(image, 0.0, 1.0)
    return tf.ensure_shape(image, [height, width, image.shape[-1]])


def preprocess_for_eval(image: tf.Tensor, *, height: int, width: int, crop: bool = True) -> tf.Tensor:
    """Evaluation view (official ``preprocess_for_eval``): 87.5% centre crop + bicubic resize.

    As in the official ``get_preprocess_fn``, the target size decides: no crop when the model's
    input is 32 px or less (CIFAR, Fashion-MNIST), whatever the source size. Without a crop the
    release only reshapes (the image must already have the target size); here an image of another
    size is resized to it.
    """
    image = tf.convert_to_tensor(image, tf.float32)
    if crop and max(height, width) > SMALL_IMAGE_SIZE:
        image = center_crop(image, height, width)
    else:
        image = _resize_if_needed(image, height, width)
    image = tf.clip_by_value(image, 0.0, 1.0)
    return tf.ensure_shape(image, [height, width, image.shape[-1]])
