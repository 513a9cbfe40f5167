"""Shim for launchers that take a file path (``deepspeed --num_gpus 8 scripts/predict.py ...``).

The command is :mod:`mapsage_ds.cli.predict` (also installed as ``mapsage-predict``); see its ``--help``.
"""

import sys

from mapsage_ds.cli.predict import console, main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(console())
