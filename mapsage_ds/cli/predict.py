r"""Predict rasters, images or a LoveDA split into class maps: GeoTIFFs for scenes, benchmark PNGs for images.

    python scripts/predict.py --model runs/b5/export --input scenes/ --output-dir preds --tile 1024 --stride 512
    python scripts/predict.py --model runs/b5/export --input 'tiles/*.tif' --bands 3,2,1 --scale p2,p98 \\
        --blend gaussian --output-dir preds
    python scripts/predict.py --model runs/b5/export --data-root /data/LoveDA --split Test --output-dir preds
    python scripts/predict.py --model runs/b5/export --images some/folder --output-dir preds --outputs labels
    torchrun --nproc_per_node 8 scripts/predict.py --ensemble runs/b5/export:0.6,runs/dinov3/export:0.4 \\
        --data-root /data/LoveDA --split Test --mode slide --tile 1024 --stride 512 --output-dir preds

--input takes a raster (GeoTIFF, COG, VRT, ...), a folder or a glob. Rasters are streamed window by
window (eval.tile / eval.stride, always sliding, whatever eval.mode says) into OUTPUT_DIR/NAME.tif: a
COG of class indices 0..6, nodata 255, the source's CRS and transform (docs/evaluation.md, "Scenes"),
with --polygons also OUTPUT_DIR/NAME.gpkg (class polygons).
Plain images (PNG/JPEG), --images and --data-root write OUTPUT_DIR/labels/NAME.png (LoveDA online
benchmark: single-channel uint8, the image's file name, value = class index 0..6),
OUTPUT_DIR/color/NAME.png and OUTPUT_DIR/overlay/NAME.png. Images and scenes are sharded across
processes; each process writes its own files. Scenes left over (fewer scenes than processes) are
shared window by window, rank 0 writing the file: OUTPUT_DIR must be a folder every process sees.
Zip OUTPUT_DIR/labels for submission.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
from mapsage_ds.data.rasters import parse_bands, parse_scaling
from mapsage_ds.errors import ConfigError
from mapsage_ds.evaluation.scenes import BLENDS, PLAIN_IMAGE_SUFFIXES, find_inputs, predict_scenes
from mapsage_ds.evaluation.writers import OUTPUT_KINDS, ImageFolder, write_predictions
from mapsage_ds.runtime.accelerator import setup_distributed, teardown_distributed


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and write the predictions; returns how many images this process wrote."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, default_recipe=None)
    add_model_arguments(parser)
    parser.add_argument("--input", help="a raster (GeoTIFF/COG/...), a folder or a glob of rasters and images")
    parser.add_argument("--images", help="a folder of images (not recursive), instead of --data-root")
    parser.add_argument("--split", default="Test", choices=["Train", "Val", "Test"])
    parser.add_argument("--scenes", default="both", choices=["urban", "rural", "both"])
    parser.add_argument("--outputs", default=",".join(OUTPUT_KINDS), help=f"any of {', '.join(OUTPUT_KINDS)}")
    scenes = parser.add_argument_group("rasters (--input)")
    scenes.add_argument("--blend", default="mean", choices=BLENDS,
                        help="how overlapping windows combine: mean (the evaluation sliding window, exactly), or a "
                             "gaussian / cosine weighting that removes seams")
    scenes.add_argument("--bands", default=None, help="three 1-based bands for R,G,B, e.g. 3,2,1 (default: the first "
                                                      "three non-alpha bands)")
    scenes.add_argument("--scale", default=None, help="map values to 0..255: LOW,HIGH (e.g. 0,3000) or per-band "
                                                      "percentiles pLOW,pHIGH (e.g. p2,p98); needed for non-uint8 data")
    scenes.add_argument("--probabilities", action="store_true", help="also write NAME_probabilities.tif")
    scenes.add_argument("--polygons", action="store_true",
                        help="also write NAME.gpkg, the class polygons (a GeoPackage; needs fiona), split at the "
                             "class map's 512 px blocks")
    scenes.add_argument("--overwrite", action="store_true", help="predict scenes whose output exists (default: skip)")
    add_protocol_arguments(parser)
    add_refine_arguments(parser)
    args = parser.parse_args(argv)
    if sum(source is not None for source in (args.input, args.images, args.data_root)) != 1:
        parser.error("pass exactly one of --input PATH (rasters/images: a file, folder or glob), --data-root "
                     "(a LoveDA-format root, with --split) or --images FOLDER")
    if args.output_dir is None:
        parser.error("--output-dir is required")
    config = config_from_args(args, default_recipe=None, extra_overrides=protocol_overrides(args))
    protocol = config.eval
    check_source_arguments(args, protocol)
    kinds = [k.strip() for k in args.outputs.split(",") if k.strip()]
    if not kinds or any(k not in OUTPUT_KINDS for k in kinds):
        raise ConfigError(f"--outputs {args.outputs!r}: expected a comma list of {', '.join(OUTPUT_KINDS)}")
    bands, scaling = parse_bands(args.bands), parse_scaling(args.scale)
    rasters, images = _split_inputs(args, bands_or_scale=args.bands is not None or args.scale is not None,
                                    refine=protocol.refine is not None)
    ctx = setup_distributed(args.accelerator)
    try:
        predictor, _ = build_predictor_from_args(args, config, device=ctx.device, protocol=protocol)
        refiner, _ = build_refiner_from_args(protocol, device=ctx.device)
        written, predicted = [], 0
        if rasters:
            results = predict_scenes(predictor, rasters, args.output_dir, tile=protocol.tile, stride=protocol.stride,
                                     window_batch_size=protocol.window_batch_size, blend=args.blend, bands=bands,
                                     scaling=scaling, device=ctx.device, rank=ctx.rank, world_size=ctx.world_size,
                                     probabilities=args.probabilities, polygons=args.polygons,
                                     overwrite=args.overwrite, progress=ctx.is_main)
            written += [r.output for r in results]
            skipped = [r.output.name for r in results if r.skipped]
            if skipped:
                print(f"rank {ctx.rank}: {len(skipped)} scene(s) already predicted, skipped (--overwrite to redo): "
                      f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}")
            predicted += len(rasters)
        if args.input is None or images is not None:
            if images is not None:
                data = ImageFolder(files=images)
                names = [p.name for p in data.files]
            elif args.images is not None:
                data = ImageFolder(args.images)
                names = [p.name for p in data.files]
            else:
                data = LoveDA(args.data_root, args.split, scenes=args.scenes)
                names = [s.name for s in data.samples]
            written += write_predictions(predictor, data, args.output_dir, names=names, device=ctx.device,
                                         rank=ctx.rank, world_size=ctx.world_size, kinds=kinds, refiner=refiner,
                                         progress=ctx.is_main)
            predicted += len(data)
        dist.barrier()
        if ctx.is_main:
            print(f"{predicted} images/scenes predicted into {args.output_dir}")
        return len(written)
    finally:
        teardown_distributed()


def _split_inputs(args: argparse.Namespace, *, bands_or_scale: bool,
                  refine: bool) -> tuple[list[Path], list[Path] | None]:
    """``--input``'s rasters and plain images (None when there are none); checks the options that apply to each."""
    if args.input is None:
        if args.polygons:
            raise ConfigError("--polygons applies to rasters given with --input")
        if bands_or_scale:
            raise ConfigError("--bands and --scale apply to rasters given with --input")
        return [], None
    files = find_inputs(args.input)
    images = [p for p in files if p.suffix.lower() in PLAIN_IMAGE_SUFFIXES]
    rasters = [p for p in files if p.suffix.lower() not in PLAIN_IMAGE_SUFFIXES]
    if images and bands_or_scale:
        raise ConfigError(f"--bands and --scale apply to rasters; {images[0]} is a plain image (predict the plain "
                          "images in a separate run)")
    if args.polygons and not rasters:
        raise ConfigError("--polygons applies to rasters given with --input")
    if rasters and refine:
        raise ConfigError(f"--refine works on whole images, not on streamed scenes such as {rasters[0]}")
    return rasters, images or None


console = as_console(main)


if __name__ == "__main__":
    sys.exit(console())
