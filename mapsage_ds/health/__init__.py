"""Health checks: the pre-flight and the plan's seven checks, each a small function returning a CheckResult.

Modules, one per check group: ``preflight`` (devices, collectives, data files, checkpoint keys),
``labels`` (1), ``eval_outputs`` (2), ``normalisation`` and ``overfit`` (3), ``alignment`` (4),
``splits`` (5), ``consistency`` (6), ``metric`` (7); ``runner`` builds their inputs from a run
config and runs them on every rank. See docs/health_checks.md.
"""

from mapsage_ds.health.result import CheckResult, Status, any_failed, format_results, write_report
from mapsage_ds.health.runner import CHECK_NAMES, HealthOptions, run_health_checks

__all__ = ["CHECK_NAMES", "CheckResult", "HealthOptions", "Status", "any_failed", "format_results",
           "run_health_checks", "write_report"]
