r"""Predict a folder of images (e.g. the LoveDA Test split) into benchmark PNGs, colour masks and overlays.

    python scripts/predict.py --model runs/b5/export --data-root /data/LoveDA --split Test --output-dir preds
    python scripts/predict.py --model runs/b5/export --images some/folder --output-dir preds --outputs labels
    torchrun --nproc_per_node 8 scripts/predict.py --ensemble runs/b5/export:0.6,runs/dinov3/export:0.4 \\
        --data-root /data/LoveDA --split Test --mode slide --tile 1024 --stride 512 --output-dir preds

Writes OUTPUT_DIR/labels/NAME.png (LoveDA online benchmark: single-channel uint8, the image's file
name, value = class index 0..6), OUTPUT_DIR/color/NAME.png and OUTPUT_DIR/overlay/NAME.png. The images
are sharded across processes; each process writes its own files. Zip OUTPUT_DIR/labels for submission.
"""

from __future__ import annotations

import argparse
import sys

import torch.distributed as dist

from mapsage_ds.cli import as_console
from mapsage_ds.cli.args import (
    add_config_arguments,
    add_model_arguments,
    add_protocol_arguments,
    add_refine_arguments,
    build_predictor_from_args,
    build_refiner_from_args,
    check_source_arguments,
    config_from_args,
    protocol_overrides,
)
from mapsage_ds.data.loveda import LoveDA
from mapsage_ds.errors import ConfigError
from mapsage_ds.evaluation.writers import OUTPUT_KINDS, ImageFolder, write_predictions
from mapsage_ds.runtime.accelerator import setup_distributed, teardown_distributed


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and write the predictions; returns how many images this process wrote."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, default_recipe=None)
    add_model_arguments(parser)
    parser.add_argument("--images", help="a folder of images (not recursive), instead of --data-root")
    parser.add_argument("--split", default="Test", choices=["Train", "Val", "Test"])
    parser.add_argument("--scenes", default="both", choices=["urban", "rural", "both"])
    parser.add_argument("--outputs", default=",".join(OUTPUT_KINDS), help=f"any of {', '.join(OUTPUT_KINDS)}")
    add_protocol_arguments(parser)
    add_refine_arguments(parser)
    args = parser.parse_args(argv)
    if (args.images is None) == (args.data_root is None):
        parser.error("pass exactly one of --data-root (a LoveDA-format root, with --split) or --images FOLDER")
    if args.output_dir is None:
        parser.error("--output-dir is required")
    config = config_from_args(args, default_recipe=None, extra_overrides=protocol_overrides(args))
    protocol = config.eval
    check_source_arguments(args, protocol)
    kinds = [k.strip() for k in args.outputs.split(",") if k.strip()]
    if not kinds or any(k not in OUTPUT_KINDS for k in kinds):
        raise ConfigError(f"--outputs {args.outputs!r}: expected a comma list of {', '.join(OUTPUT_KINDS)}")
    ctx = setup_distributed(args.accelerator)
    try:
        predictor, _ = build_predictor_from_args(args, config, device=ctx.device, protocol=protocol)
        refiner, _ = build_refiner_from_args(protocol, device=ctx.device)
        if args.images is not None:
            data = ImageFolder(args.images)
            names = [p.name for p in data.files]
        else:
            data = LoveDA(args.data_root, args.split, scenes=args.scenes)
            names = [s.name for s in data.samples]
        written = write_predictions(predictor, data, args.output_dir, names=names, device=ctx.device, rank=ctx.rank,
                                    world_size=ctx.world_size, kinds=kinds, refiner=refiner, progress=ctx.is_main)
        dist.barrier()
        if ctx.is_main:
            print(f"{len(data)} images predicted into {args.output_dir} ({', '.join(kinds)})")
        return len(written)
    finally:
        teardown_distributed()


console = as_console(main)


if __name__ == "__main__":
    sys.exit(console())
