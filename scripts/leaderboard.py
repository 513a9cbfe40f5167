"""Shim for launchers that take a file path (``deepspeed --num_gpus 8 scripts/leaderboard.py ...``).

The command is :mod:`mapsage_ds.cli.leaderboard` (also installed as ``mapsage-leaderboard``); see its ``--help``.
"""

import sys

from mapsage_ds.cli.leaderboard import console, main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(console())
