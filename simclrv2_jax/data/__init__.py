"""Input: data sources, SimCLR augmentations and tf.data pipelines.

TensorFlow only feeds data here. Importing this package keeps it on the CPU, once for the process,
before any of its modules builds a tensor, so that it never reserves GPU/TPU memory that JAX needs.
"""

import tensorflow as tf


def _keep_tensorflow_on_cpu() -> None:
    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError):
            # Already initialised (too late to change) or no such device type: nothing to hide.
            pass


_keep_tensorflow_on_cpu()
