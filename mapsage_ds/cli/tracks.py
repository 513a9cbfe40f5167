"""Run several experiment tracks at once on disjoint card groups and score them into one leaderboard.

    python scripts/run_tracks.py docs/tracks.yaml                       # train, evaluate, leaderboard
    python scripts/run_tracks.py docs/tracks.yaml --leaderboard-only    # evaluate existing runs again
    python scripts/run_tracks.py docs/tracks.yaml --resume              # finish what an interrupted run left
    python scripts/run_tracks.py docs/tracks_cpu_demo.yaml              # two tiny tracks on a CPU

Each track runs in its own process group (its cards, master port, output directory and log);
when it finishes, scripts/evaluate.py scores it with the file's one evaluation protocol. A failed
track is reported and does not stop the others; the exit status is 1 when any track failed.
Writes OUTPUT_DIR/leaderboard.md and leaderboard.json (see docs/tracks.md).
"""

from __future__ import annotations

import argparse
import sys

from mapsage_ds.cli import as_console
from mapsage_ds.errors import ConfigError
from mapsage_ds.runtime.accelerator import ACCELERATORS, detect_accelerator
from mapsage_ds.tracks.runner import TrackRunner
from mapsage_ds.tracks.spec import read_tracks_config


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the tracks, print the leaderboard; returns 1 if any track failed, else 0."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tracks", help="tracks file (YAML)")
    parser.add_argument("--leaderboard-only", action="store_true",
                        help="do not train: evaluate the tracks' existing weights and write the leaderboard")
    parser.add_argument("--resume", action="store_true",
                        help="keep the tracks an earlier run finished, evaluate those whose training finished, "
                             "resume the others from their latest checkpoint")
    parser.add_argument("--output-dir", default=None, help="overrides the file's output_dir")
    parser.add_argument("--accelerator", default=None, choices=ACCELERATORS,
                        help="device type of every track (default: $MAPSAGE_ACCELERATOR, else detected)")
    args = parser.parse_args(argv)
    config = read_tracks_config(args.tracks)
    if args.output_dir is not None:
        config.output_dir = args.output_dir
    accelerator = detect_accelerator(args.accelerator)
    runner = TrackRunner(config, accelerator=accelerator)
    print(f"{len(config.tracks)} track(s) on {accelerator} with {config.launcher}; outputs in {config.output_dir}",
          flush=True)
    if args.resume and args.leaderboard_only:
        raise ConfigError("--resume and --leaderboard-only contradict each other: pick one")
    result = runner.run(leaderboard_only=args.leaderboard_only, resume=args.resume)
    print((runner.root / "leaderboard.md").read_text(), end="", flush=True)
    failed = [row["name"] for row in result["tracks"] if row["status"] != "ok"]
    if failed:
        print(f"failed track(s): {', '.join(failed)} (see their logs and status.json)", flush=True)
    return 1 if failed else 0


console = as_console(main, returns_status=True)


if __name__ == "__main__":
    sys.exit(console())
