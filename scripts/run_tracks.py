"""Shim for launchers that take a file path (``deepspeed --num_gpus 8 scripts/run_tracks.py ...``).

The command is :mod:`mapsage_ds.cli.tracks` (also installed as ``mapsage-tracks``); see its ``--help``.
"""

import sys

from mapsage_ds.cli.tracks import console, main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(console())
