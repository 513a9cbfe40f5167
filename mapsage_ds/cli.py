"""Command-line arguments shared by the scripts: recipe, config file, overrides."""

from __future__ import annotations

import argparse
import json

from mapsage_ds.accelerator import ACCELERATORS
from mapsage_ds.config import Config, load_config, recipe_names


def add_config_arguments(parser: argparse.ArgumentParser, *, default_recipe: str | None) -> None:
    """``--recipe``, ``--config``, ``--set`` and the common shortcuts."""
    parser.add_argument("--recipe", default=None,
                        help=f"packaged recipe ({', '.join(recipe_names())}); default: {default_recipe}")
    parser.add_argument("--config", default=None, help="YAML file with config fields (applied after --recipe)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field, e.g. --set optim.lr=1e-4 (repeatable)")
    parser.add_argument("--data-root", default=None, help="shortcut for --set data.root=PATH")
    parser.add_argument("--output-dir", default=None, help="shortcut for --set output_dir=PATH")
    parser.add_argument("--accelerator", default=None,
                        help=f"device type: {' | '.join(ACCELERATORS)} (default: $MAPSAGE_ACCELERATOR, "
                             f"else the first present in that order)")
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace, *, default_recipe: str | None) -> Config:
    """Resolve the run config the arguments describe."""
    recipe = args.recipe or (default_recipe if args.config is None else None)
    overrides = list(args.overrides)
    if args.data_root is not None:
        overrides.append(f"data.root={json.dumps(args.data_root)}")
    if args.output_dir is not None:
        overrides.append(f"output_dir={json.dumps(args.output_dir)}")
    return load_config(recipe=recipe, config_file=args.config, overrides=overrides)
