"""SimCLRv2 in JAX/Flax: contrastive pretraining, fine-tuning on few labels, distillation."""

__version__ = "0.1.0"
