"""Shim for launchers that take a file path (``deepspeed --num_gpus 8 scripts/evaluate.py ...``).

The command is :mod:`mapsage_ds.cli.evaluate` (also installed as ``mapsage-evaluate``); see its ``--help``.
"""

import sys

from mapsage_ds.cli.evaluate import console, main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(console())
