"""The leaderboard of a tracks run, as markdown."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mapsage_ds.config import from_dict
from mapsage_ds.evaluation.protocol import EvalProtocol
from mapsage_ds.evaluation.report import leaderboard_markdown


def leaderboard_text(rows: list[dict[str, Any]], evaluation: dict[str, Any], reports: list[Path]) -> str:
    """Markdown: the scores table (``leaderboard_markdown``), then the facts of each track."""
    protocol = from_dict(EvalProtocol, {k: evaluation[k] for k in EvalProtocol.__dataclass_fields__})
    lines = ["# Leaderboard", "",
             f"Every track scored by mapsage-evaluate on {evaluation['split']} ({evaluation['scenes']} scenes, "
             f"{evaluation['weights']} weights) with one protocol: {json.dumps(protocol.to_dict())}, boundary band "
             f"{evaluation['boundary_width'] or evaluation['boundary_dilation_ratio']}"
             f"{' px' if evaluation['boundary_width'] else ' of the diagonal'}.", ""]
    if reports:
        lines += [leaderboard_markdown(reports)]
    else:
        lines += ["No track finished.", ""]
    roots = {r["data_root"] for r in rows if r["status"] == "ok"}
    if len(roots) > 1:
        lines += [f"**Warning:** tracks were evaluated on different data roots ({', '.join(sorted(roots))}); "
                  "set evaluation.data_root to compare them.", ""]
    lines += ["## Tracks", "", "| track | status | mIoU % | cards | processes | train wall time | eval wall time | "
              "output |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        status = row["status"] if row["status"] != "failed" else f"FAILED ({row['failed_phase']})"
        miou = f"{100 * row['miou']:.2f}" if row.get("miou") is not None else "—"
        cards = ",".join(map(str, row["cards"])) if row["cards"] else "—"
        lines.append(f"| {row['name']} | {status} | {miou} | {cards} | {row['processes']} | "
                     f"{_duration(row['train_wall_s'])} | {_duration(row['eval_wall_s'])} | {row['output_dir']} |")
    failures = [r for r in rows if r["status"] == "failed"]
    if failures:
        lines += ["", "## Failures", ""]
        for row in failures:
            first = (row["error"] or "").splitlines()[0] if row["error"] else ""
            lines.append(f"- **{row['name']}** ({row['failed_phase']}): {first} (log: {row['output_dir']})")
    return "\n".join(lines) + "\n"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
