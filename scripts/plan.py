"""Shim for launchers that take a file path (``deepspeed --num_gpus 8 scripts/plan.py ...``).

The command is :mod:`mapsage_ds.cli.plan` (also installed as ``mapsage-plan``); see its ``--help``.
"""

import sys

from mapsage_ds.cli.plan import console, main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(console())
