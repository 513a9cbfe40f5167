r"""Prove the server, the data and the evaluation are healthy before spending compute.

    deepspeed --num_gpus 8 scripts/health_check.py --recipe segformer_b5_loveda --data-root /data/LoveDA \\
        --set model.pretrained=/weights/mit-b5 --expect-device gcu
    torchrun --nproc_per_node 2 scripts/health_check.py --recipe demo --expect-device cpu
    python scripts/health_check.py --recipe demo --only preflight --only 7
    python scripts/health_check.py --accelerator gcu --write-deepspeed-env .deepspeed_env

Prints one line per check (PASS / WARN / FAIL, a figure, what to fix), writes a JSON report
(--report, default OUTPUT_DIR/health_check.json) and exits 1 on any FAIL. Pre-flight: devices and
precisions, collectives with bus bandwidth, data files, checkpoint keys; then the plan's seven
checks (see docs/health_checks.md). Rank 0 also prints the accelerator's environment: the variables
(ECCL_*, TOPS_*, NCCL_*, ...) that every node must see alike. ``--write-deepspeed-env PATH`` only
writes them to a ``.deepspeed_env`` for the ``deepspeed`` launcher to carry to the other nodes
(docs/multinode.md) and runs no check.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mapsage_ds.cli import as_console
from mapsage_ds.cli.args import add_config_arguments, config_from_args
from mapsage_ds.config import to_dict
from mapsage_ds.health import CHECK_NAMES, HealthOptions, any_failed, format_results, run_health_checks, write_report
from mapsage_ds.runtime.accelerator import (
    ACCELERATORS,
    detect_accelerator,
    install_deepspeed_accelerator,
    setup_distributed,
    teardown_distributed,
)
from mapsage_ds.runtime.launchers import deepspeed_env_lines, write_deepspeed_env

DEFAULT_RECIPE = "demo"
_DEFAULTS = HealthOptions()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of the health check."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, default_recipe=DEFAULT_RECIPE)
    parser.add_argument("--report", default=None, help="JSON report path (default: OUTPUT_DIR/health_check.json)")
    parser.add_argument("--full", action="store_true", help="decode every file (default: a sample per split)")
    parser.add_argument("--sample", type=int, default=_DEFAULTS.sample, help="files decoded per split without --full")
    parser.add_argument("--expect-device", choices=ACCELERATORS, default=None,
                        help="device type every rank must run on (default: accept the detected one; CPU warns)")
    parser.add_argument("--matmul-size", type=int, default=_DEFAULTS.matmul_size)
    parser.add_argument("--collective-mb", type=float, default=_DEFAULTS.collective_mb,
                        help="buffer of the bandwidth measurement, MiB")
    parser.add_argument("--overfit-steps", type=int, default=_DEFAULTS.overfit_steps)
    parser.add_argument("--overfit-factor", type=float, default=_DEFAULTS.overfit_factor,
                        help="the loss must fall by at least this factor")
    parser.add_argument("--overfit-miou", type=float, default=_DEFAULTS.overfit_miou,
                        help="mIoU the overfitted batch must reach")
    parser.add_argument("--overfit-lr", type=float, default=None, help="constant lr (default: the recipe's optim.lr)")
    parser.add_argument("--overfit-images", type=int, default=_DEFAULTS.overfit_images)
    parser.add_argument("--overfit-crop", type=int, default=None, help="crop side (default: data.crop_size)")
    parser.add_argument("--alignment-images", type=int, default=_DEFAULTS.alignment_images)
    parser.add_argument("--eval-images", type=int, default=_DEFAULTS.eval_images)
    parser.add_argument("--pretrain-images", action="append", default=[], metavar="DIR",
                        help="folder of extra training images (e.g. EarthVQA) checked for val/test overlap; repeatable")
    parser.add_argument("--final-eval", default=None, metavar="YAML",
                        help="tracks file or run config whose evaluation settings the final evaluation uses "
                             "(default: scripts/evaluate.py's defaults)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help=f"run only these checks or groups (repeatable): preflight, 1..7 or a full name "
                             f"({', '.join(CHECK_NAMES)})")
    parser.add_argument("--skip", action="append", default=[], metavar="NAME", help="leave out checks (as --only)")
    parser.add_argument("--write-deepspeed-env", default=None, metavar="PATH",
                        help="write the accelerator's environment (ECCL_*, TOPS_*, NCCL_*, MAPSAGE_*, GLOO_* ...) to "
                             "PATH, normally ./.deepspeed_env, for the deepspeed launcher to export on every node; "
                             "runs no check")
    return parser.parse_args(argv)


def options_from_args(args: argparse.Namespace) -> HealthOptions:
    """The :class:`HealthOptions` the arguments describe."""
    return HealthOptions(
        full=args.full, sample=args.sample, expect_device=args.expect_device, matmul_size=args.matmul_size,
        collective_mb=args.collective_mb, overfit_steps=args.overfit_steps, overfit_factor=args.overfit_factor,
        overfit_miou=args.overfit_miou, overfit_lr=args.overfit_lr, overfit_images=args.overfit_images,
        overfit_crop=args.overfit_crop, alignment_images=args.alignment_images, eval_images=args.eval_images,
        pretrain_images=tuple(args.pretrain_images), final_eval=args.final_eval, only=tuple(args.only),
        skip=tuple(args.skip),
    )


def main(argv: list[str] | None = None) -> int:
    """Run the checks; returns (and, run as a script, exits with) 1 on any FAIL, else 0."""
    args = parse_args(argv)
    if args.write_deepspeed_env:
        prefixes = install_deepspeed_accelerator(detect_accelerator(args.accelerator)).export_envs()
        lines = write_deepspeed_env(args.write_deepspeed_env, prefixes)
        print("\n".join([f"wrote {len(lines)} variable(s) to {args.write_deepspeed_env}:", *lines]), flush=True)
        return 0
    config = config_from_args(args, default_recipe=DEFAULT_RECIPE)
    options = options_from_args(args)
    ctx = setup_distributed(args.accelerator)
    try:
        from deepspeed.accelerator import get_accelerator

        environment = deepspeed_env_lines(get_accelerator().export_envs(), os.environ)
        if ctx.is_main:
            print("\n".join([f"accelerator environment ({ctx.accelerator}, {ctx.launcher} launcher): "
                             f"{len(environment)} variable(s) every node must share", *environment]), flush=True)
        results = run_health_checks(config, ctx, options)
        if ctx.is_main:
            report = Path(args.report) if args.report else Path(config.output_dir) / "health_check.json"
            context = {"recipe": args.recipe or (DEFAULT_RECIPE if args.config is None else None),
                       "world_size": ctx.world_size, "accelerator": ctx.accelerator, "backend": ctx.backend,
                       "launcher": ctx.launcher, "environment": environment,
                       "options": vars(options), "config": to_dict(config)}
            write_report(report, results, context=context)
            print(format_results(results), flush=True)
            print(f"report written to {report}", flush=True)
    finally:
        teardown_distributed()
    return 1 if any_failed(results) else 0


console = as_console(main, returns_status=True)


if __name__ == "__main__":
    sys.exit(console())
