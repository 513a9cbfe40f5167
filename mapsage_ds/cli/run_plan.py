"""Run the whole experiment plan from one file: health checks, tracks, champion, phase 2, TTA sweep, SAM, ensemble.

    python scripts/run_plan.py docs/plan_cpu_demo.yaml                 # the plan end to end on a CPU (demo data)
    python scripts/run_plan.py docs/plan_v4.yaml                       # the 8-card server plan
    python scripts/run_plan.py docs/plan_v4.yaml --resume              # continue after a stop or a failed phase

Phases, in order (docs/plan.md): the health checks on every card (a FAIL stops the plan); the
tracks in parallel on their card groups, scored with the one evaluation protocol; the champion
(the best track) and the phase-2 decision (the champion's phase2_recipe, or distillation from
the teacher track when its fine-tuning was unstable by the plan's rule); phase 2 on all cards;
a TTA sweep on the best model; optional SAM refinement; a weighted ensemble of the best models.
Writes OUTPUT_DIR/report.md and report.json: each phase's outcome and one leaderboard.

Each phase's outcome is recorded when it ends; --resume keeps finished phases and continues
the interrupted one (training from its latest checkpoint). Exits 1 when a phase fails, 130 when
interrupted (Ctrl-C or SIGTERM stop every job the plan started).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from mapsage_ds.cli import as_console
from mapsage_ds.runtime.accelerator import ACCELERATORS, detect_accelerator
from mapsage_ds.tracks.launch import check_single_node
from mapsage_ds.tracks.plan_runner import PhaseFailed, PlanRunner
from mapsage_ds.tracks.plan_spec import read_plan

INTERRUPTED = 130


def _stop_on_sigterm(signum, frame) -> None:
    # A scheduler's SIGTERM is handled like Ctrl-C: the running jobs are stopped, the state kept.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the plan; returns 0 when every phase finished, 1 when one failed, 130 when stopped."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", help="plan file (YAML), e.g. docs/plan_v4.yaml")
    parser.add_argument("--output-dir", default=None, help="overrides the file's output_dir")
    parser.add_argument("--resume", action="store_true", help="continue the plan already in the output directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the plan already in the output directory (its outputs are deleted)")
    parser.add_argument("--accelerator", default=None, choices=ACCELERATORS,
                        help="device type of every job (default: $MAPSAGE_ACCELERATOR, else detected)")
    args = parser.parse_args(argv)
    plan = read_plan(args.plan)
    if args.output_dir is not None:
        plan.output_dir = args.output_dir
    check_single_node(os.environ)
    accelerator = detect_accelerator(args.accelerator)
    runner = PlanRunner(plan, plan_text=Path(args.plan).read_text(), accelerator=accelerator, resume=args.resume,
                        overwrite=args.overwrite)
    print(f"plan {args.plan}: {len(plan.tracks)} track(s) on {accelerator} with {plan.launcher}; outputs in "
          f"{plan.output_dir}", flush=True)
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        runner.run()
    except PhaseFailed as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        print(f"report written to {runner.root / 'report.md'}; fix the cause, then run again with --resume",
              flush=True)
        return error.exit_status
    except KeyboardInterrupt:
        print(f"interrupted: every job was stopped; continue with --resume (state in {runner.root})",
              file=sys.stderr, flush=True)
        return INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
    print((runner.root / "report.md").read_text(), end="", flush=True)
    return 0


console = as_console(main, returns_status=True)


if __name__ == "__main__":
    sys.exit(console())
