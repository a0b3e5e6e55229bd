"""SK-ResNet backbones and the SimCLRv2 heads; named architectures are in ``simclrv2_jax.config.fields``."""

from simclrv2_jax.models.simclr import SimCLRModel, parameter_counts

__all__ = ["SimCLRModel", "parameter_counts"]
