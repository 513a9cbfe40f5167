"""Evaluate a model (or an ensemble) on a LoveDA-format split, sharded across processes.

    python scripts/evaluate.py --model runs/demo/export --data-root data/demo_loveda --split Val
    deepspeed --num_gpus 8 scripts/evaluate.py --model runs/b5/export --data-root /data/LoveDA --split Val \\
        --mode slide --tile 1024 --stride 512 --tta-scales 0.75,1.0,1.25,1.5 --tta-flip
    torchrun --nproc_per_node 8 scripts/evaluate.py --ensemble runs/b5/export:0.6,runs/dinov3/export:0.4 \\
        --data-root /data/LoveDA --output-dir runs/ensemble_eval
    python scripts/evaluate.py --checkpoint runs/b5/checkpoints --config runs/b5/config.yaml --data-root ...
    python scripts/evaluate.py --model runs/b5/export --data-root ... --refine sam --sam-model /weights/sam-vit-base

The protocol (whole/slide, TTA) is the same Predictor that validation during training uses, and
1 and N processes give identical numbers. The report (metrics.json, metrics.md, confusion matrix,
per-class IoU chart, panels) goes to --output-dir (default: MODEL/eval_SPLIT, or
CHECKPOINT/../eval_SPLIT for a checkpoint).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch.distributed as dist

from mapsage_ds.accelerator import setup_distributed, teardown_distributed
from mapsage_ds.data.classes import IGNORE_INDEX, LOVEDA_CLASSES
from mapsage_ds.data.loveda import LoveDA
from mapsage_ds.errors import ConfigError
from mapsage_ds.evaluation import run_evaluation
from mapsage_ds.inference_setup import (
    add_model_arguments,
    add_protocol_arguments,
    add_refine_arguments,
    build_predictor,
    build_refiner,
    check_source_arguments,
    protocol_from_args,
)
from mapsage_ds.metrics import SegmentationMetrics
from mapsage_ds.report import report_dict, write_report


def _output_dir(args: argparse.Namespace) -> Path:
    if args.output_dir is not None:
        return Path(args.output_dir)
    if args.model is not None:
        return Path(args.model) / f"eval_{args.split}"
    if args.checkpoint is not None:
        return Path(args.checkpoint).resolve().parent / f"eval_{args.split}"
    raise ConfigError("--ensemble needs --output-dir for its report")


def main(argv: list[str] | None = None) -> SegmentationMetrics:
    """Parse ``argv``, evaluate, print the per-class table and write the report; returns the metrics."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--data-root", required=True, help="LoveDA-format root")
    parser.add_argument("--split", default="Val", choices=["Train", "Val"])
    parser.add_argument("--scenes", default="both", choices=["urban", "rural", "both"])
    parser.add_argument("--batch-size", type=int, default=1, help="images per step")
    parser.add_argument("--max-images", type=int, default=None, help="evaluate the first N images only")
    add_protocol_arguments(parser)
    parser.add_argument("--boundary-width", type=int, default=None,
                        help="boundary IoU band in pixels (default: --boundary-dilation-ratio of the diagonal)")
    parser.add_argument("--boundary-dilation-ratio", type=float, default=0.02)
    add_refine_arguments(parser)
    parser.add_argument("--output-dir", default=None, help="report directory")
    parser.add_argument("--output", default=None, help="also write metrics.json to this path")
    parser.add_argument("--num-panels", type=int, default=4, help="image/GT/prediction panels in the report")
    parser.add_argument("--accelerator", default=None)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    protocol = protocol_from_args(args)
    check_source_arguments(args)
    output_dir = _output_dir(args)

    ctx = setup_distributed(args.accelerator)
    try:
        predictor, info = build_predictor(args, device=ctx.device, protocol=protocol)
        refiner, refinement = build_refiner(args, device=ctx.device)
        data = LoveDA(args.data_root, args.split, scenes=args.scenes)
        result = run_evaluation(
            predictor, data, device=ctx.device, rank=ctx.rank, world_size=ctx.world_size,
            class_names=list(LOVEDA_CLASSES), ignore_index=IGNORE_INDEX, batch_size=args.batch_size,
            max_images=args.max_images, boundary_width=args.boundary_width,
            boundary_dilation_ratio=args.boundary_dilation_ratio, refiner=refiner,
            num_panels=args.num_panels,
        )
        forwards = [None] * ctx.world_size
        dist.all_gather_object(forwards, result.forwards)
        if ctx.is_main:
            num_images = len(data) if args.max_images is None else min(args.max_images, len(data))
            info.update(data_root=str(args.data_root), split=args.split, scenes=args.scenes, num_images=num_images,
                        world_size=ctx.world_size, forwards_per_rank=forwards, protocol=protocol.to_dict(),
                        refinement=refinement,
                        boundary={"width": args.boundary_width, "dilation_ratio": args.boundary_dilation_ratio})
            write_report(output_dir, result.metrics, info=info, before=result.before_refinement,
                         panels=result.panels)
            if args.output is not None:
                content = report_dict(result.metrics, info=info, before=result.before_refinement)
                Path(args.output).write_text(json.dumps(content, indent=2) + "\n")
            if result.before_refinement is not None:
                print("before refinement:\n" + result.before_refinement.format_table() + "\n\nafter refinement:")
            print(result.metrics.format_table())
            print(f"report written to {output_dir}")
        return result.metrics
    finally:
        teardown_distributed()


if __name__ == "__main__":
    main()
