"""Estimate memory per card for every ZeRO stage × CPU offload × activation checkpointing option.

Recommends the cheapest that fits, the lowest stage first (ZeRO-0 → 1 → 2 → 3 → offload), and says why.

    python scripts/plan.py --recipe dinov3_sat_vit7b_loveda --cards 8 --card-memory 32GB
    python scripts/plan.py --recipe segformer_b5_loveda --set train.micro_batch_size=4 --card-memory 80GB

The model is built on the meta device: nothing is allocated and no weights or data are read.
Memory sizes are binary (a "32GB" card holds 32 GiB). See docs/planner.md for the model.
"""

from __future__ import annotations

import argparse
import sys

from mapsage_ds.builders import build_memory_plan, build_meta_model
from mapsage_ds.cli import as_console
from mapsage_ds.cli.args import add_config_arguments, config_from_args
from mapsage_ds.data.classes import LOVEDA_CLASSES
from mapsage_ds.planning.model_states import GIB
from mapsage_ds.planning.plan import DEFAULT_MARGIN, DEFAULT_OVERHEAD, MemoryPlan, format_plan, parse_size


def main(argv: list[str] | None = None) -> MemoryPlan:
    """Parse ``argv``, print the plan and return it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, default_recipe=None)
    parser.add_argument("--cards", type=int, default=8, help="data-parallel processes, one per card (default 8)")
    parser.add_argument("--card-memory", default="32GB", help="memory of one card, e.g. 32GB (default), 80GiB")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                        help=f"fraction of each card kept free (default {DEFAULT_MARGIN})")
    parser.add_argument("--overhead", default=f"{DEFAULT_OVERHEAD / GIB:g}GiB",
                        help="per-card runtime context, collective buffers and fragmentation (default %(default)s)")
    parser.add_argument("--host-memory", default=None,
                        help="host memory of the node, to check the offload options against (unchecked if absent)")
    args = parser.parse_args(argv)
    if args.recipe is None and args.config is None:
        parser.error("pass --recipe NAME or --config FILE")
    config = config_from_args(args, default_recipe=None)
    plan = build_memory_plan(
        config, build_meta_model(config, list(LOVEDA_CLASSES)), cards=args.cards,
        card_memory=parse_size(args.card_memory), margin=args.margin,
        overhead=parse_size(args.overhead),
        host_memory=parse_size(args.host_memory) if args.host_memory is not None else None,
    )
    print(format_plan(plan), flush=True)
    return plan


console = as_console(main)


if __name__ == "__main__":
    sys.exit(console())
