r"""Evaluate a model (or an ensemble) on one split of the data (LoveDA tree or HF dataset), sharded across processes.

    python scripts/evaluate.py --model runs/demo/export --data-root data/demo_loveda --split Val
    deepspeed --num_gpus 8 scripts/evaluate.py --model runs/b5/export --data-root /data/LoveDA --split Val \\
        --mode slide --tile 1024 --stride 512 --tta-scales 0.75,1.0,1.25,1.5 --tta-flip
    torchrun --nproc_per_node 8 scripts/evaluate.py --ensemble runs/b5/export:0.6,runs/dinov3/export:0.4 \\
        --data-root /data/LoveDA --output-dir runs/ensemble_eval
    python scripts/evaluate.py --checkpoint runs/b5/checkpoints --config runs/b5/config.yaml --data-root ...
    python scripts/evaluate.py --model runs/b5/export --data-root ... --refine sam --sam-model /weights/sam-vit-base
    python scripts/evaluate.py --model runs/b5/export --data-root ... --tta-sweep scales=0.75,1,1.25,1.5 flips=h,v,d4
    python scripts/evaluate.py --model runs/b5/export --data-root /data/loveda_hf --set data.source=hf \\
        --split validation

The data is read as training reads it (``data.source``: a LoveDA tree, or a local Hugging Face
dataset, a ``save_to_disk`` folder or parquet files); ``--split`` defaults to ``data.val_split``.

The protocol (whole/slide, TTA) is the same Predictor that validation during training uses, and
1 and N processes give identical numbers. The report (metrics.json, metrics.md, confusion matrix,
per-class IoU chart, panels) goes to --output-dir (default: MODEL/eval_SPLIT, or
CHECKPOINT/../eval_SPLIT for a checkpoint).

--tta-sweep scores many TTA protocols in one pass instead (each view predicted once per image):
every non-empty subset of the scales crossed with every subset of the flip options that share no
view (d4 holds h, v and hv, so it stands alone); the identity view of each scale is always in. It
prints and writes a leaderboard (tta_sweep.json, tta_sweep.md: mIoU, boundary IoU, views and
network evaluations per image, best mIoU first) instead of the single-protocol report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch.distributed as dist
from torch.utils.data import Dataset

from mapsage_ds.builders import build_dataset, data_root
from mapsage_ds.cli import as_console
from mapsage_ds.cli.args import (
    add_config_arguments,
    add_model_arguments,
    add_protocol_arguments,
    add_refine_arguments,
    add_sweep_argument,
    build_predictor_from_args,
    build_refiner_from_args,
    check_source_arguments,
    config_from_args,
    protocol_overrides,
)
from mapsage_ds.data.classes import IGNORE_INDEX, LOVEDA_CLASSES
from mapsage_ds.errors import ConfigError, raised_on_every_rank
from mapsage_ds.evaluation.loop import run_evaluation
from mapsage_ds.evaluation.metrics import SegmentationMetrics
from mapsage_ds.evaluation.protocol import EvalProtocol
from mapsage_ds.evaluation.report import report_dict, write_report
from mapsage_ds.evaluation.sweep import SweepResult, parse_sweep, run_sweep, sweep_protocols, write_sweep_report
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


@raised_on_every_rank()
def _swept_protocols(args: argparse.Namespace, protocol: EvalProtocol) -> list[EvalProtocol] | None:
    """The protocols of ``--tta-sweep`` (None without it); refused with the flags it replaces or refinement."""
    if args.tta_sweep is None:
        return None
    clashing = [flag for flag, value in (("--tta-scales", args.tta_scales), ("--tta-flip", args.tta_flip),
                                         ("--refine sam (eval.refine)", protocol.refine)) if value]
    if clashing:
        raise ConfigError(f"--tta-sweep cannot be combined with {', '.join(clashing)}: the sweep chooses the TTA "
                          "itself and scores the unrefined predictions")
    return sweep_protocols(protocol, parse_sweep(args.tta_sweep))


def main(argv: list[str] | None = None) -> SegmentationMetrics | SweepResult:
    """Parse ``argv``, evaluate, print the per-class table and write the report; returns the metrics.

    With ``--tta-sweep``: print and write the sweep's leaderboard; returns the :class:`SweepResult`.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, default_recipe=None)
    add_model_arguments(parser)
    parser.add_argument("--split", default=None,
                        help="split scored: a LoveDA folder (Val, Train) or the split of a data.source=hf dataset "
                             "(default: data.val_split)")
    parser.add_argument("--scenes", default=None, choices=["urban", "rural", "both"],
                        help="shorthand for --set data.scenes=...")
    add_protocol_arguments(parser)
    add_sweep_argument(parser)
    add_refine_arguments(parser)
    parser.add_argument("--output", default=None,
                        help="also write metrics.json (tta_sweep.json with --tta-sweep) to this path")
    parser.add_argument("--num-panels", type=int, default=4, help="image/GT/prediction panels in the report")
    args = parser.parse_args(argv)
    scenes = [] if args.scenes is None else [f"data.scenes={args.scenes}"]
    config = config_from_args(args, default_recipe=None, extra_overrides=[*scenes, *protocol_overrides(args)])
    protocol = config.eval
    args.split = config.data.val_split if args.split is None else args.split
    check_source_arguments(args, protocol)
    swept = _swept_protocols(args, protocol)
    report_dir = _report_dir(args)
    root = data_root(config.data)
    ctx = setup_distributed(args.accelerator)
    try:
        predictor, info = build_predictor_from_args(args, config, device=ctx.device, protocol=protocol)
        refiner, refinement = build_refiner_from_args(protocol, device=ctx.device)
        data = build_dataset(config.data, args.split)
        if not getattr(data, "has_masks", True):
            raise ConfigError(f"--split {args.split}: {data!r} has no masks to score against")
        if swept is not None:
            return _sweep(args, predictor, data, swept, ctx=ctx, info=info, report_dir=report_dir, root=root,
                          scenes=config.data.scenes)
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


def _sweep(args: argparse.Namespace, predictor, data: Dataset, protocols: list[EvalProtocol], *, ctx, info: dict,
           report_dir: Path, root: Path, scenes: str) -> SweepResult:
    result = run_sweep(predictor, data, protocols=protocols, device=ctx.device, rank=ctx.rank,
                       world_size=ctx.world_size, class_names=list(LOVEDA_CLASSES), ignore_index=IGNORE_INDEX)
    forwards = [None] * ctx.world_size
    dist.all_gather_object(forwards, result.forwards)
    if ctx.is_main:
        base = protocols[0]
        num_images = len(data) if base.max_images is None else min(base.max_images, len(data))
        info.update(data_root=str(root), split=args.split, scenes=scenes, num_images=num_images,
                    world_size=ctx.world_size, forwards_per_rank=forwards,
                    sweep={"spec": " ".join(args.tta_sweep),
                           **{k: v for k, v in base.scored().items() if k not in ("tta_scales", "tta_flip")}},
                    boundary={"width": base.boundary_width, "dilation_ratio": base.boundary_dilation_ratio})
        print(write_sweep_report(report_dir, result, info=info, output=args.output))
        print(f"TTA sweep written to {report_dir}")
    return result


console = as_console(main)


if __name__ == "__main__":
    sys.exit(console())
