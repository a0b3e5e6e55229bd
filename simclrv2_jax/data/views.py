"""What a SimCLR view is: the parameters of the augmentations, in one place for both implementations.

The host implementation (``augment.py``, TensorFlow ops in tf.data) and the device implementation
(``device_augment.py``, JAX inside the step) draw from the same distributions; these are the
release's values (``data_util.py``). Pure Python: importing this imports neither TF nor JAX.
"""

CROP_AREA_RANGE = (0.08, 1.0)  # random resized crop: fraction of the image area
CROP_ASPECT_RANGE = (3 / 4, 4 / 3)  # and of width / height (scaled by the target's aspect)
CROP_MAX_ATTEMPTS = 100  # then the whole image
CROP_MIN_COVERED = 0.1  # the crop must cover this much of the whole image (TF's overlap check)
FLIP_PROBABILITY = 0.5
JITTER_PROBABILITY = 0.8
GRAYSCALE_PROBABILITY = 0.2
# Colour jitter amounts per unit of strength: brightness, contrast, saturation, hue.
JITTER_AMOUNTS = (0.8, 0.8, 0.8, 0.2)
BLUR_PROBABILITY = 0.5
BLUR_SIGMA_RANGE = (0.1, 2.0)
CROP_PROPORTION = 0.875  # evaluation centre crop (224 of 256)
SMALL_IMAGE_SIZE = 32  # at or below this size: no evaluation crop (and the CIFAR stem, no blur)


def blur_kernel_size(height: int) -> int:
    """The release's blur size: ``height // 10`` made odd, radius ``height // 20`` (23 taps at 224 px)."""
    return 2 * ((height // 10) // 2) + 1
