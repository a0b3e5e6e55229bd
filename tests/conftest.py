"""Test set-up: 8 virtual CPU devices for sharding tests, TensorFlow kept off accelerators."""

import os
import tempfile

# Must happen before JAX is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# The CPU convolution paths measured in this session (models/conv_autotune.py) are stored here, and
# shared with the command-line tests' subprocesses, not in the user's ~/.cache.
os.environ.setdefault(
    "SIMCLR_CONV_CACHE", os.path.join(tempfile.mkdtemp(prefix="simclrv2_conv_"), "conv_plans.json")
)
# Measuring is bounded per process; past it the fixed rules are taken (and stored), so a small budget
# keeps the suite's time while still exercising the measured path on the first layers met.
os.environ.setdefault("SIMCLR_CONV_AUTOTUNE_BUDGET_S", "20")

import tensorflow as tf

tf.config.set_visible_devices([], "GPU")
