"""SK-ResNet backbones, SimCLRv2 heads and named model presets."""

from simclrv2_jax.models.presets import MODEL_PRESETS, model_preset, parameter_counts
from simclrv2_jax.models.resnet import BLOCK_SPECS, ENDPOINT_NAMES, ResNet
from simclrv2_jax.models.simclr import SimCLRModel

__all__ = ["BLOCK_SPECS", "ENDPOINT_NAMES", "MODEL_PRESETS", "ResNet", "SimCLRModel", "model_preset",
           "parameter_counts"]
