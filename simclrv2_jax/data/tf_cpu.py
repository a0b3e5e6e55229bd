"""TensorFlow for the input pipeline, kept on the CPU.

Every module of the package that uses TensorFlow imports it from here (``from
simclrv2_jax.data.tf_cpu import tf``), so the accelerators are hidden from TF in this one place,
once, before TF builds a tensor: it must never reserve GPU/TPU memory that JAX needs. Nothing
imports this module unless it needs TF: training on in-memory data with augmentation on the device
runs where TensorFlow is not installed.
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

__all__ = ["tf"]
