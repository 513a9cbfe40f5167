"""Shim for launchers that take a file path (``deepspeed --num_gpus 8 scripts/distill.py ...``).

The command is :mod:`mapsage_ds.cli.distill` (also installed as ``mapsage-distill``); see its ``--help``.
"""

import sys

from mapsage_ds.cli.distill import console, main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(console())
