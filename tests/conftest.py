"""Test set-up: 8 virtual CPU devices for sharding tests, TensorFlow kept off accelerators."""

import os

# Must happen before JAX is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import tensorflow as tf

tf.config.set_visible_devices([], "GPU")
