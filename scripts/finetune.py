"""Fine-tune a segmentation model through DeepSpeed.

    python scripts/finetune.py                                   # demo recipe on generated data
    deepspeed --num_gpus 8 scripts/finetune.py --recipe segformer_b5_loveda \
        --data-root /data/LoveDA --output-dir runs/b5
    torchrun --nproc_per_node 2 scripts/finetune.py --recipe demo --resume
"""

from __future__ import annotations

import argparse

import torch.distributed as dist

from mapsage_ds.accelerator import setup_distributed
from mapsage_ds.cli import add_config_arguments, config_from_args
from mapsage_ds.finetune import run_finetune
from mapsage_ds.metrics import SegmentationMetrics

DEFAULT_RECIPE = "demo"


def main(argv: list[str] | None = None) -> SegmentationMetrics:
    """Parse ``argv``, train, evaluate and export; returns the final validation metrics."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, default_recipe=DEFAULT_RECIPE)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    args = parser.parse_args(argv)
    config = config_from_args(args, default_recipe=DEFAULT_RECIPE)
    ctx = setup_distributed(args.accelerator)
    try:
        return run_finetune(config, ctx, resume=args.resume)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
