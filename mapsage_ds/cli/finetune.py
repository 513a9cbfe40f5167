"""Fine-tune a segmentation model through DeepSpeed.

python scripts/finetune.py                                   # demo recipe on generated data
deepspeed --num_gpus 8 scripts/finetune.py --recipe segformer_b5_loveda \
        --data-root /data/LoveDA --output-dir runs/b5
torchrun --nproc_per_node 2 scripts/finetune.py --recipe demo --resume
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from mapsage_ds.builders import build_memory_plan, build_meta_model, lr_scales, unfreeze_plan
from mapsage_ds.cli import as_console
from mapsage_ds.cli.args import add_config_arguments, config_from_args
from mapsage_ds.config import Config, to_dict
from mapsage_ds.data.classes import LOVEDA_CLASSES
from mapsage_ds.evaluation.metrics import SegmentationMetrics
from mapsage_ds.planning.dry_run import describe_run
from mapsage_ds.planning.plan import parse_size
from mapsage_ds.runtime.accelerator import setup_distributed, teardown_distributed
from mapsage_ds.training.run import run_finetune

DEFAULT_RECIPE = "demo"


def main(argv: list[str] | None = None) -> SegmentationMetrics | None:
    """Parse ``argv``, train, evaluate and export; returns the final validation metrics."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, default_recipe=DEFAULT_RECIPE)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in output_dir (its checkpoints, exports and logs are deleted)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config, parameter counts, param groups and memory plan; no training")
    parser.add_argument("--cards", type=int, default=None, help="--dry-run: cards to plan for (default: WORLD_SIZE)")
    parser.add_argument("--card-memory", default="32GB", help="--dry-run: memory of one card")
    args = parser.parse_args(argv)
    config = config_from_args(args, default_recipe=DEFAULT_RECIPE)
    if args.dry_run:
        cards = args.cards or int(os.environ.get("WORLD_SIZE", 1))
        print(dry_run(config, cards=cards, card_memory=args.card_memory))
        return None
    ctx = setup_distributed(args.accelerator)
    try:
        return run_finetune(config, ctx, resume=args.resume, overwrite=args.overwrite)
    finally:
        teardown_distributed()


def dry_run(config: Config, *, cards: int, card_memory: str) -> str:
    """The ``--dry-run`` report: resolved config, trainable parameters per phase, param groups, memory plan.

    Reads no data and no weights: the model is built on the meta device.
    """
    built = build_meta_model(config, list(LOVEDA_CLASSES))
    memory = build_memory_plan(config, built, cards=cards, card_memory=parse_size(card_memory))
    return describe_run(config_text=yaml.safe_dump(to_dict(config), sort_keys=False), built=built,
                        unfreeze=unfreeze_plan(config.unfreeze), weight_decay=config.optim.weight_decay,
                        lr_scale_of=lr_scales(config.optim, built), memory=memory)


console = as_console(main)


if __name__ == "__main__":
    sys.exit(console())
