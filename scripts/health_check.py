"""Shim for launchers that take a file path (``deepspeed --num_gpus 8 scripts/health_check.py ...``).

The command is :mod:`mapsage_ds.cli.health` (also installed as ``mapsage-health``); see its ``--help``.
"""

import sys

from mapsage_ds.cli.health import console, main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(console())
