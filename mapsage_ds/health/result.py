"""What a health check returns, and how a list of them is printed and saved."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from mapsage_ds.files import json_safe, write_json


class Status(str, Enum):
    """Outcome of one check; any FAIL makes ``scripts/health_check.py`` exit non-zero."""

    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class CheckResult:
    """One check's verdict.

    Attributes:
        name: Dotted name, ``<group>.<check>`` (``preflight.devices``, ``1.raw_mask_values`` ...).
        status: PASS, WARN or FAIL.
        figure: The measured figure in a few words (``"7 classes, ignore 255"``, ``"loss ÷4.1 in 30 steps"``).
        message: What was found.
        fix: What to change; empty when there is nothing to fix.
        details: Machine-readable measurements for the JSON report.
    """

    name: str
    status: Status
    figure: str
    message: str
    fix: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def line(self, name_width: int = 32) -> str:
        """The one line printed for this check."""
        text = f"{self.status.value:<4}  {self.name:<{name_width}}  {self.figure}  | {self.message}"
        return text + (f"  | fix: {self.fix}" if self.fix else "")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (NaN becomes null)."""
        return json_safe({"name": self.name, "status": self.status.value, "figure": self.figure,
                           "message": self.message, "fix": self.fix, "details": self.details})


def passed(name: str, figure: str, message: str, **details: Any) -> CheckResult:
    """A PASS result."""
    return CheckResult(name, Status.PASS, figure, message, "", details)


def warned(name: str, figure: str, message: str, fix: str, **details: Any) -> CheckResult:
    """A WARN result."""
    return CheckResult(name, Status.WARN, figure, message, fix, details)


def failed(name: str, figure: str, message: str, fix: str, **details: Any) -> CheckResult:
    """A FAIL result."""
    return CheckResult(name, Status.FAIL, figure, message, fix, details)


def any_failed(results: Sequence[CheckResult]) -> bool:
    """Whether any result is a FAIL."""
    return any(r.status is Status.FAIL for r in results)


def format_results(results: Sequence[CheckResult]) -> str:
    """One line per check, then a summary line."""
    width = max([len(r.name) for r in results] + [10])
    counts = {s: sum(r.status is s for r in results) for s in Status}
    lines = [r.line(width) for r in results]
    lines.append(f"{len(results)} checks: {counts[Status.PASS]} PASS, {counts[Status.WARN]} WARN, "
                 f"{counts[Status.FAIL]} FAIL")
    return "\n".join(lines)


def write_report(path: str | Path, results: Sequence[CheckResult], *, context: dict[str, Any]) -> Path:
    """Write the JSON report: ``context`` (recipe, world size, device ...), the results and a summary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = {s.value: sum(r.status is s for r in results) for s in Status}
    data = {**json_safe(context), "ok": not any_failed(results), "summary": counts,
            "results": [r.to_dict() for r in results]}
    write_json(path, data)
    return path

