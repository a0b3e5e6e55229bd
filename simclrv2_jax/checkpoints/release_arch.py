"""The architecture of a released checkpoint, from its variables' shapes alone: stem, width, block
kind and counts, SK and SE ratios, projection head, classes and the supervised head's selector."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from simclrv2_jax.checkpoints.release_read import (
    ConversionError,
    drop_training_state,
    parse_names,
    shape_of,
    unknown_error,
)
from simclrv2_jax.config.fields import SK_RATIO, base_config
from simclrv2_jax.models.resnet import BLOCK_SPECS

# The resolution the released models were trained at; any size > 32 builds the same network.
RELEASE_IMAGE_SIZE = 224
CIFAR_IMAGE_SIZE = 32

# ---------------------------------------------------------------------------------------------------
# The architecture from the shapes.


@dataclass
class _Conv:
    name: str
    shape: tuple[int, ...]
    has_bias: bool


class _ConvReader:
    """Reads the backbone's convs in creation order, checking each against the expected shape."""

    def __init__(self, convs: list[_Conv]):
        self.convs = convs
        self.i = 0

    def peek(self) -> _Conv | None:
        return self.convs[self.i] if self.i < len(self.convs) else None

    def take(self, what: str, kernel: int, cin: int | None, cout: int | None) -> _Conv:
        conv = self.peek()
        ok = (
            conv is not None
            and conv.shape[:2] == (kernel, kernel)
            and (cin is None or conv.shape[2] == cin)
            and (cout is None or conv.shape[3] == cout)
        )
        if not ok:
            want = [kernel, kernel, "?" if cin is None else cin, "?" if cout is None else cout]
            got = "nothing" if conv is None else f"{conv.name} {list(conv.shape)}"
            raise ConversionError(
                f"Cannot read the backbone's layout: expected the {what} conv {want} next, found {got}."
            )
        self.i += 1
        return conv


def _ratio(pairs: list[tuple[int, int]], floor: int, preferred: float | None) -> float:
    """A ratio r with ``max(int(f * r), floor) == width`` for every (f, width): the release's rule."""

    def fits(r: float) -> bool:
        return all(max(int(f * r), floor) == width for f, width in pairs)

    if preferred is not None and fits(preferred):
        return preferred
    lo = max((width / f for f, width in pairs if width > floor), default=0.0)
    hi = min((width + 1) / f if width > floor else (floor + 1) / f for f, width in pairs)
    for candidate in (lo, (lo + hi) / 2):
        if candidate > 0 and fits(candidate):
            return candidate
    raise ConversionError(f"No single ratio gives the widths {pairs} (filters, width) of these layers.")


def _infer_backbone(convs: list[_Conv]) -> dict[str, Any]:
    """Stem, width, block kind, blocks per group, SK and SE from the convs' shapes."""
    if not convs:
        raise ConversionError("The checkpoint has no backbone convolutions (base_model/... or resnet/...).")
    reader = _ConvReader(convs)
    first = convs[0].shape
    second = convs[1].shape if len(convs) > 1 else None
    if first[:2] == (7, 7):
        stem = "imagenet"
        width_channels = reader.take("7x7 stem", 7, 3, None).shape[3]
    elif second is not None and second[:2] == (3, 3) and second[2] == first[3]:
        stem = "resnet_d"  # three 3x3 convs, the SK models' stem
        half = reader.take("first ResNet-D stem", 3, 3, None).shape[3]
        reader.take("second ResNet-D stem", 3, half, half)
        width_channels = reader.take("third ResNet-D stem", 3, half, 2 * half).shape[3]
    else:
        stem = "cifar"
        width_channels = reader.take("3x3 CIFAR stem", 3, 3, None).shape[3]
    # The first block's projection shortcut is 1x1; a bottleneck block goes on with a 1x1 conv, a
    # basic block with a 3x3.
    after = convs[reader.i + 1].shape if reader.i + 1 < len(convs) else None
    kind = "basic" if after is not None and after[:2] == (3, 3) else "bottleneck"
    expansion = 4 if kind == "bottleneck" else 1

    counts, sk_pairs, se_pairs = [], [], []
    cin = width_channels
    for group in range(1, 5):
        filters = width_channels * 2 ** (group - 1)
        out = expansion * filters
        blocks = 0
        while True:
            where = f"block group {group}, block {blocks}"
            if blocks == 0:
                reader.take(f"projection shortcut ({where})", 1, cin, out)
            if kind == "bottleneck":
                reader.take(f"first 1x1 ({where})", 1, cin if blocks == 0 else out, filters)
                nxt = reader.peek()
                if nxt is not None and nxt.shape == (3, 3, filters, 2 * filters):
                    reader.take(f"SK two-stream 3x3 ({where})", 3, filters, 2 * filters)
                    mid = reader.take(f"SK squeeze ({where})", 1, filters, None).shape[3]
                    reader.take(f"SK mixing ({where})", 1, mid, 2 * filters)
                    sk_pairs.append((filters, mid))
                else:
                    reader.take(f"3x3 ({where})", 3, filters, filters)
                reader.take(f"last 1x1 ({where})", 1, filters, out)
            else:
                reader.take(f"first 3x3 ({where})", 3, cin if blocks == 0 else out, filters)
                reader.take(f"second 3x3 ({where})", 3, filters, filters)
            nxt = reader.peek()
            if nxt is not None and nxt.has_bias:
                reduced = reader.take(f"SE reduce ({where})", 1, out, None).shape[3]
                reader.take(f"SE expand ({where})", 1, reduced, out)
                se_pairs.append((filters, reduced))
            blocks += 1
            nxt = reader.peek()
            start = (1, 1, out, filters) if kind == "bottleneck" else (3, 3, out, filters)
            if nxt is None or nxt.shape != start or nxt.has_bias:
                break
        counts.append(blocks)
        cin = out
    if reader.peek() is not None:
        extra = ", ".join(f"{c.name} {list(c.shape)}" for c in convs[reader.i :])
        raise ConversionError(f"Backbone convs left over after four block groups: {extra}.")

    if kind == "bottleneck" and (stem == "resnet_d") != bool(sk_pairs) and stem != "cifar":
        raise ConversionError(
            "The ResNet-D stem and the selective-kernel convs go together in the release (sk_ratio > 0); "
            "this checkpoint has one without the other."
        )
    if kind == "bottleneck" and sk_pairs and len(sk_pairs) != sum(counts):
        raise ConversionError("Only some bottleneck blocks have selective-kernel convs.")
    if se_pairs and len(se_pairs) != sum(counts):
        raise ConversionError("Only some blocks have squeeze-and-excitation convs.")
    if sk_pairs:
        sk_ratio = _ratio(sk_pairs, 32, SK_RATIO)
    else:
        # Basic blocks have no SK convs: the ResNet-D stem is what says sk_ratio > 0. (With a CIFAR stem
        # a basic-block SK model differs only in its shortcuts' pooling, which has no variables.)
        sk_ratio = SK_RATIO if stem == "resnet_d" else 0.0
    se_ratio = _ratio(se_pairs, 1, None) if se_pairs else 0.0

    depth = (3 if kind == "bottleneck" else 2) * sum(counts) + 2
    standard = BLOCK_SPECS.get(depth) == (kind, tuple(counts))
    return dict(
        resnet_depth=depth,
        block_counts=None if standard else tuple(counts),
        width_multiplier=width_channels / 64,
        sk_ratio=sk_ratio,
        se_ratio=se_ratio,
        cifar_stem=stem == "cifar",
        features=cin,
    )


def infer_config(weights: Mapping[str, Any], ft_proj_selector: int | None = None) -> dict[str, Any]:
    """This project's config fields for an official checkpoint's variables (name -> array or shape).

    Returns ``resnet_depth``, ``width_multiplier``, ``sk_ratio``, ``se_ratio``, ``proj_head_mode``,
    ``num_proj_layers``, ``proj_out_dim``, ``ft_proj_selector``, ``num_classes`` (0: no supervised
    head) and ``image_size``: 32 for a CIFAR stem, else 224, the released models' resolution (the
    variables only say whether the size is <= 32: any larger size builds the same network). When the
    blocks per group are not those of a standard depth, ``block_counts`` is added and
    ``resnet_depth`` is the layer count ``3 * blocks + 2`` (bottleneck) or ``2 * blocks + 2`` (basic).

    ``ft_proj_selector``: which of ``hiddens = [h, head layer 1, ...]`` the supervised head reads.
    Neither format records it; the supervised kernel's input width decides it when only one hidden
    has that width. Otherwise (a 3-layer head whose middle layers keep the backbone's width) it must
    be given; a given value that does not fit the kernel's width is an error.
    """
    parsed = parse_names(drop_training_state(weights))
    if parsed.unknown:
        raise unknown_error(parsed.unknown)
    no_kernel = [
        name for layer in parsed.convs if "kernel" not in layer.names for name in layer.names.values()
    ]
    if no_kernel:
        raise ConversionError(f"Backbone conv variables without a kernel: {no_kernel}.")
    convs = [
        _Conv(layer.names["kernel"], shape_of(weights[layer.names["kernel"]]), "bias" in layer.names)
        for layer in parsed.convs
    ]
    backbone = _infer_backbone(convs)
    defaults = base_config("finetune")

    # Projection head.
    layers = sorted(parsed.head)
    if layers != list(range(len(layers))):
        raise ConversionError(f"Projection head layers {layers} are not numbered 0..{len(layers) - 1}.")
    dims = [backbone["features"]]
    for j in layers:
        dense = parsed.head[j].get("dense", {})
        if "kernel" not in dense:
            raise ConversionError(f"Projection head layer {j} has no dense kernel.")
        kernel = shape_of(weights[dense["kernel"]])
        if kernel[0] != dims[-1]:
            raise ConversionError(
                f"Projection head layer {j}'s kernel {list(kernel)} does not take width {dims[-1]}."
            )
        dims.append(kernel[1])
    if parsed.head_kind is None:
        head_mode, num_layers, out_dim = "none", defaults.num_proj_layers, defaults.proj_out_dim
    elif parsed.head_kind == "l":
        if len(layers) != 1:
            raise ConversionError(
                f"A linear projection head has one layer (l_0); this one has {len(layers)}."
            )
        head_mode, num_layers, out_dim = "linear", defaults.num_proj_layers, dims[-1]
    else:
        head_mode, num_layers, out_dim = "nonlinear", len(layers), dims[-1]
        if any(d != dims[0] for d in dims[1:-1]):
            raise ConversionError(
                f"The middle projection layers must keep the backbone width; widths {dims}."
            )

    # Supervised head and the selector.
    num_classes, selector = 0, 0 if ft_proj_selector is None else ft_proj_selector
    if parsed.supervised:
        if "kernel" not in parsed.supervised:
            raise ConversionError("head_supervised has a bias but no kernel.")
        width, num_classes = shape_of(weights[parsed.supervised["kernel"]])
        fits = [k for k, d in enumerate(dims) if d == width]
        if ft_proj_selector is not None:
            index = ft_proj_selector if ft_proj_selector >= 0 else len(dims) + ft_proj_selector
            if not 0 <= index < len(dims):
                raise ConversionError(
                    f"ft_proj_selector={ft_proj_selector} is out of range for hiddens of widths {dims}."
                )
            if dims[index] != width:
                raise ConversionError(
                    f"ft_proj_selector={ft_proj_selector} selects a hidden of width {dims[index]}, but the "
                    f"supervised head's kernel takes width {width} (selectors that fit: {fits})."
                )
        elif len(fits) == 1:
            selector = fits[0]
        elif not fits:
            raise ConversionError(f"The supervised head takes width {width}, which no hidden {dims} has.")
        else:
            raise ConversionError(
                f"The supervised head (width {width}) could read any of hiddens {fits} (widths {dims}); the "
                "checkpoint does not record which. Pass ft_proj_selector (0: the backbone output, what "
                "linear evaluation during pretraining reads by default; 1: the first head layer, "
                "SimCLRv2's fine-tuning choice)."
            )

    config = dict(
        resnet_depth=backbone["resnet_depth"],
        width_multiplier=backbone["width_multiplier"],
        sk_ratio=backbone["sk_ratio"],
        se_ratio=backbone["se_ratio"],
        proj_head_mode=head_mode,
        num_proj_layers=num_layers,
        proj_out_dim=out_dim,
        ft_proj_selector=selector,
        num_classes=num_classes,
        image_size=CIFAR_IMAGE_SIZE if backbone["cifar_stem"] else RELEASE_IMAGE_SIZE,
    )
    if backbone["block_counts"] is not None:
        config["block_counts"] = backbone["block_counts"]
    return config
