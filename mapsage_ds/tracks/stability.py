"""Whether a track's direct fine-tuning was unstable, read from what its run wrote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mapsage_ds.tracks.plan_spec import StabilityRule


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``{run_dir}/metrics.jsonl`` (none if the run wrote none); a torn last line is left out."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def instability(status: dict[str, Any], rows: list[dict[str, Any]], rule: StabilityRule) -> list[str]:
    """Why ``rule`` calls the run unstable, one reason per condition met; empty when it is stable.

    Args:
        status: The track's ``status.json`` (its ``status`` and ``failed_phase``).
        rows: Its ``metrics.jsonl`` rows (``train`` rows carry ``skipped_steps``, ``val`` rows ``miou``).
        rule: The plan's rule.
    """
    reasons = []
    if rule.failed_training and status.get("status") == "failed" and status.get("failed_phase") == "train":
        first = (status.get("error") or "").splitlines()[:1]
        reasons.append(f"its training failed ({first[0] if first else 'no error recorded'})")
    skipped = max((row.get("skipped_steps") or 0 for row in rows if row.get("kind") == "train"), default=0)
    if skipped > rule.max_skipped_steps:
        reasons.append(f"it skipped {skipped} optimizer steps on non-finite gradients (rule: at most "
                       f"{rule.max_skipped_steps})")
    scores = [(row["step"], row["miou"]) for row in rows if row.get("kind") == "val" and row.get("miou") is not None]
    if scores:
        best_step, best = max(scores, key=lambda s: s[1])
        last_step, last = scores[-1]
        if best - last > rule.max_val_drop:
            reasons.append(f"its validation mIoU fell from {best:.4f} (step {best_step}) to {last:.4f} (step "
                           f"{last_step}), more than {rule.max_val_drop}")
        if best < rule.min_val_miou:
            reasons.append(f"its best validation mIoU {best:.4f} stayed below {rule.min_val_miou}")
    return reasons
