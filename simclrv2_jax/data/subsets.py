"""Labeled subsets for semi-supervised fine-tuning: official ImageNet lists, class-balanced elsewhere."""

import math

import numpy as np


def label_fraction_subset(
    labels,
    *,
    num_classes: int,
    fraction: float | None = None,
    per_class: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Sorted indices of a deterministic class-balanced subset: ``per_class`` examples of each class.

    With ``fraction``, ``per_class = round(fraction * len(labels) / num_classes)`` (1% of
    Fashion-MNIST's 60,000 = 60 per class). Each class draws without replacement from its own
    NumPy ``default_rng((seed, class))`` stream, so a class's choice does not depend on the others.
    """
    labels = np.asarray(labels)
    if (fraction is None) == (per_class is None):
        raise ValueError("Give exactly one of fraction and per_class.")
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
        per_class = int(round(fraction * len(labels) / num_classes))
    if per_class <= 0:
        raise ValueError(
            f"The subset would hold {per_class} examples per class; use a larger fraction or per_class."
        )
    counts = np.bincount(labels, minlength=num_classes)
    if len(counts) > num_classes:
        raise ValueError(f"Labels go up to {len(counts) - 1} but num_classes is {num_classes}.")
    short = {c: int(n) for c, n in enumerate(counts) if n < per_class}
    if short:
        raise ValueError(
            f"Cannot take {per_class} examples per class: classes {short} (class: count) have fewer."
        )
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        rng = np.random.default_rng((seed, c))
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


# The official semi-supervised ImageNet image lists ship as tfds configs.
_IMAGENET_SUBSETS = {0.01: "imagenet2012_subset/1pct", 0.1: "imagenet2012_subset/10pct"}


def labeled_split(dataset: str, label_fraction: float) -> tuple[str, str] | None:
    """``(tfds_name, split)`` of the official labeled subset, or None (then use
    ``label_fraction_subset``). Only ImageNet 1% and 10% have official lists."""
    if dataset != "imagenet2012":
        return None
    for fraction, name in _IMAGENET_SUBSETS.items():
        if math.isclose(label_fraction, fraction):
            return name, "train"
    return None
