"""Shim for ``python scripts/convert_weights.py SRC DST``.

The command is :mod:`mapsage_ds.cli.convert` (also installed as ``mapsage-convert``); see its ``--help``.
"""

import sys

from mapsage_ds.cli.convert import console, main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(console())
