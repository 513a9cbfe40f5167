"""Shim: ``python scripts/run_plan.py PLAN.yaml`` (started once, without a launcher: it launches every job itself).

The command is :mod:`mapsage_ds.cli.run_plan` (also installed as ``mapsage-run-plan``); see its ``--help``.
"""

import sys

from mapsage_ds.cli.run_plan import console, main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(console())
