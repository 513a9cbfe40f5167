r"""Evaluate a model (or an ensemble) on a LoveDA-format split, sharded across processes.

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
import sys
from pathlib import Path

import torch.distributed as dist

from mapsage_ds.builders import data_root
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
from mapsage_ds.data.classes import IGNORE_INDEX, LOVEDA_CLASSES
from mapsage_ds.data.loveda import LoveDA
from mapsage_ds.errors import ConfigError
from mapsage_ds.evaluation.loop import run_evaluation
from mapsage_ds.evaluation.metrics import SegmentationMetrics
from mapsage_ds.evaluation.report import report_dict, write_report
from mapsage_ds.files import write_json
from mapsage_ds.runtime.accelerator import setup_distributed, teardown_distributed


def _report_dir(args: argparse.Namespace) -> Path:
    if args.output_dir is not None:
        return Path(args.output_dir)
    if args.model is not None:
        return Path(args.model) / f"eval_{args.split}"
    if args.checkpoint is not None:
        return Path(args.checkpoint).resolve().parent / f"eval_{args.split}"
    raise ConfigError("--ensemble (eval.ensemble) needs --output-dir for its report")


def main(argv: list[str] | None = None) -> SegmentationMetrics:
    """Parse ``argv``, evaluate, print the per-class table and write the report; returns the metrics."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, default_recipe=None)
    add_model_arguments(parser)
    parser.add_argument("--split", default="Val", choices=["Train", "Val"])
    parser.add_argument("--scenes", default=None, choices=["urban", "rural", "both"],
                        help="shorthand for --set data.scenes=...")
    add_protocol_arguments(parser)
    add_refine_arguments(parser)
    parser.add_argument("--output", default=None, help="also write metrics.json to this path")
    parser.add_argument("--num-panels", type=int, default=4, help="image/GT/prediction panels in the report")
    args = parser.parse_args(argv)
    scenes = [] if args.scenes is None else [f"data.scenes={args.scenes}"]
    config = config_from_args(args, default_recipe=None, extra_overrides=[*scenes, *protocol_overrides(args)])
    protocol = config.eval
    check_source_arguments(args, protocol)
    report_dir = _report_dir(args)
    root = data_root(config.data)
    ctx = setup_distributed(args.accelerator)
    try:
        predictor, info = build_predictor_from_args(args, config, device=ctx.device, protocol=protocol)
        refiner, refinement = build_refiner_from_args(protocol, device=ctx.device)
        data = LoveDA(root, args.split, scenes=config.data.scenes)
        result = run_evaluation(predictor, data, protocol=protocol, device=ctx.device, rank=ctx.rank,
                                world_size=ctx.world_size, class_names=list(LOVEDA_CLASSES), ignore_index=IGNORE_INDEX,
                                refiner=refiner, num_panels=args.num_panels)
        forwards = [None] * ctx.world_size
        dist.all_gather_object(forwards, result.forwards)
        if ctx.is_main:
            num_images = len(data) if protocol.max_images is None else min(protocol.max_images, len(data))
            info.update(data_root=str(root), split=args.split, scenes=config.data.scenes, num_images=num_images,
                        world_size=ctx.world_size, forwards_per_rank=forwards, protocol=protocol.to_dict(),
                        refinement=refinement,
                        boundary={"width": protocol.boundary_width,
                                  "dilation_ratio": protocol.boundary_dilation_ratio})
            write_report(report_dir, result.metrics, info=info, before=result.before_refinement,
                         panels=result.panels)
            if args.output is not None:
                write_json(args.output, report_dict(result.metrics, info=info, before=result.before_refinement))
            if result.before_refinement is not None:
                print("before refinement:\n" + result.before_refinement.format_table() + "\n\nafter refinement:")
            print(result.metrics.format_table())
            print(f"report written to {report_dir}")
        return result.metrics
    finally:
        teardown_distributed()


console = as_console(main)


if __name__ == "__main__":
    sys.exit(console())
