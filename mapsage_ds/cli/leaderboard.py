"""Build a markdown leaderboard from evaluation report directories (their metrics.json alone).

python scripts/leaderboard.py runs/b5/export/eval_Val runs/dinov3/export/eval_Val --output leaderboard.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mapsage_ds.cli import as_console
from mapsage_ds.evaluation.report import leaderboard_markdown


def main(argv: list[str] | None = None) -> str:
    """Parse ``argv``, print the leaderboard (and write it with ``--output``); returns the markdown."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", help="report directories (or metrics.json files)")
    parser.add_argument("--output", default=None, help="markdown file to write")
    args = parser.parse_args(argv)
    table = leaderboard_markdown(args.reports)
    if args.output is not None:
        Path(args.output).write_text(table)
    print(table, end="")
    return table


console = as_console(main)


if __name__ == "__main__":
    sys.exit(console())
