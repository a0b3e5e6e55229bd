"""Per-stage configs (``get_config(arg)`` with presets); ``configs/*.py`` at the repo root wrap these."""

from simclrv2_jax.configs.base import validate

__all__ = ["validate"]
