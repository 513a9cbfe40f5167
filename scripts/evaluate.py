"""Evaluate an exported model on a LoveDA-format split, sharded across processes.

    python scripts/evaluate.py --model runs/demo/export --data-root data/demo_loveda --split Val
    torchrun --nproc_per_node 2 scripts/evaluate.py --model runs/b5/export --data-root /data/LoveDA

The protocol is whole-image inference, the same function the training loop validates with, so
numbers compare across experiments and across process counts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch.distributed as dist

from mapsage_ds.accelerator import setup_distributed
from mapsage_ds.data.classes import IGNORE_INDEX, LOVEDA_CLASSES
from mapsage_ds.data.loaders import TransformedDataset
from mapsage_ds.data.loveda import LoveDA
from mapsage_ds.data.transforms import EvalTransform
from mapsage_ds.evaluation import evaluate
from mapsage_ds.metrics import SegmentationMetrics
from mapsage_ds.models import load_exported
from mapsage_ds.tasks import SegmentationTask


def main(argv: list[str] | None = None) -> SegmentationMetrics:
    """Parse ``argv``, evaluate, print the per-class table and write ``metrics.json``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="directory written by finetune.py (export/ or best/)")
    parser.add_argument("--data-root", required=True, help="LoveDA-format root")
    parser.add_argument("--split", default="Val", choices=["Train", "Val"])
    parser.add_argument("--scenes", default="both", choices=["urban", "rural", "both"])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--output", default=None, help="metrics.json path (default: MODEL/eval_SPLIT.json)")
    parser.add_argument("--accelerator", default=None)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    ctx = setup_distributed(args.accelerator)
    try:
        model, normalize = load_exported(args.model)
        task = SegmentationTask(model.to(ctx.device), ignore_index=IGNORE_INDEX)
        data = TransformedDataset(LoveDA(args.data_root, args.split, scenes=args.scenes), EvalTransform(normalize),
                                  seed=0)
        metrics = evaluate(task, data, device=ctx.device, rank=ctx.rank, world_size=ctx.world_size,
                           class_names=list(LOVEDA_CLASSES), ignore_index=IGNORE_INDEX, batch_size=args.batch_size)
        if ctx.is_main:
            output = Path(args.output or Path(args.model) / f"eval_{args.split}.json")
            output.write_text(json.dumps(metrics.to_dict(), indent=2))
            print(metrics.format_table())
        return metrics
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
