"""Print a model's parameter count per part without allocating its weights.

python -m simclrv2_jax.count_parameters r152_3x_sk1
python -m simclrv2_jax.count_parameters r18_0.25x --image_size=28 --num_classes=10
python -m simclrv2_jax.count_parameters --all
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from simclrv2_jax.config.fields import MODEL_PRESETS, model_preset
from simclrv2_jax.models.simclr import SimCLRModel, parameter_counts

PARTS = (
    ("backbone", "backbone"),
    ("backbone_paper", "backbone+BN stats"),
    ("head_projection", "projection head"),
    ("head_supervised", "supervised head"),
    ("total", "total"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simclrv2_jax.count_parameters",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("presets", nargs="*", help="model presets, e.g. r50_2x_sk1")
    parser.add_argument("--all", action="store_true", help="every preset")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--proj_out_dim", type=int, default=128)
    parser.add_argument("--num_proj_layers", type=int, default=3)
    args = parser.parse_args(argv)
    names = sorted(MODEL_PRESETS) if args.all else args.presets
    if not names:
        parser.error(f"name a preset or pass --all. Presets: {', '.join(sorted(MODEL_PRESETS))}")
    print(
        "Parameters in millions, from shapes only (nothing allocated). 'backbone+BN stats' is what the\n"
        "paper's Table 1 counts."
    )
    print(f"{'preset':<16}" + "".join(f"{label:>19}" for _, label in PARTS))
    for name in names:
        try:
            arch = model_preset(name)
        except ValueError as e:
            print(e, file=sys.stderr)
            return 2
        model = SimCLRModel(
            **arch,
            cifar_stem=args.image_size <= 32,
            num_classes=args.num_classes,
            proj_out_dim=args.proj_out_dim,
            num_proj_layers=args.num_proj_layers,
        )
        counts = parameter_counts(model, args.image_size)
        # Paper Table 1 counts the backbone's BN moving statistics too.
        counts["backbone_paper"] = counts["backbone"] + counts.get("backbone_bn_stats", 0)
        print(f"{name:<16}" + "".join(f"{counts.get(key, 0) / 1e6:>18.2f}M" for key, _ in PARTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
