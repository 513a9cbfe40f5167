"""Shim: regenerate docs/config.md from the config dataclasses and the recipes (``--check``: only compare).

The generator is :mod:`mapsage_ds.config_docs`; see its ``--help``.
"""

import sys

from mapsage_ds.config_docs import console, main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(console())
