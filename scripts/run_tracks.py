"""Shim: ``python scripts/run_tracks.py TRACKS.yaml`` (started once, without a launcher: it launches every track).

The command is :mod:`mapsage_ds.cli.tracks` (also installed as ``mapsage-tracks``); see its ``--help``.
"""

import sys

from mapsage_ds.cli.tracks import console, main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(console())
