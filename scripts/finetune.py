"""Shim for launchers that take a file path (``deepspeed --num_gpus 8 scripts/finetune.py ...``).

The command is :mod:`mapsage_ds.cli.finetune` (also installed as ``mapsage-finetune``); see its ``--help``.
"""

import sys

from mapsage_ds.cli.finetune import console, main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(console())
