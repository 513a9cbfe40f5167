"""Predict a folder of images (e.g. the LoveDA Test split) into benchmark PNGs, colour masks and overlays.

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

import torch.distributed as dist

from mapsage_ds.accelerator import setup_distributed, teardown_distributed
from mapsage_ds.data.loveda import LoveDA
from mapsage_ds.errors import ConfigError
from mapsage_ds.inference_setup import (
    add_model_arguments,
    add_protocol_arguments,
    add_refine_arguments,
    build_predictor,
    build_refiner,
    check_source_arguments,
    protocol_from_args,
)
from mapsage_ds.prediction import OUTPUT_KINDS, ImageFolder, write_predictions


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and write the predictions; returns how many images this process wrote."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--data-root", help="LoveDA-format root (with --split)")
    inputs.add_argument("--images", help="a folder of images (not recursive)")
    parser.add_argument("--split", default="Test", choices=["Train", "Val", "Test"])
    parser.add_argument("--scenes", default="both", choices=["urban", "rural", "both"])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--outputs", default=",".join(OUTPUT_KINDS), help=f"any of {', '.join(OUTPUT_KINDS)}")
    add_protocol_arguments(parser)
    add_refine_arguments(parser)
    parser.add_argument("--accelerator", default=None)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    protocol = protocol_from_args(args)
    check_source_arguments(args)
    kinds = [k.strip() for k in args.outputs.split(",") if k.strip()]
    if not kinds or any(k not in OUTPUT_KINDS for k in kinds):
        raise ConfigError(f"--outputs {args.outputs!r}: expected a comma list of {', '.join(OUTPUT_KINDS)}")

    ctx = setup_distributed(args.accelerator)
    try:
        predictor, _ = build_predictor(args, device=ctx.device, protocol=protocol)
        refiner, _ = build_refiner(args, device=ctx.device)
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


if __name__ == "__main__":
    main()
