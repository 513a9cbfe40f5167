"""Check 2: the evaluator reports per-class IoU, a confusion matrix and boundary IoU, not only a mean."""

from __future__ import annotations

from typing import Any

from mapsage_ds.evaluation.metrics import SegmentationMetrics, boundary_width_for
from mapsage_ds.health.result import CheckResult, failed, passed, warned

BAND_PIXELS = (2, 3)  # the plan's boundary band


def band_width(*, boundary_width: int | None, dilation_ratio: float, height: int, width: int) -> int:
    """The boundary band in pixels that the evaluation settings give on an image of this size."""
    if boundary_width is not None:
        return boundary_width
    return boundary_width_for(height, width, dilation_ratio=dilation_ratio)


def check_evaluation_outputs(metrics: SegmentationMetrics | dict[str, Any], *, num_classes: int,
                             band_pixels: int | None) -> CheckResult:
    """What the evaluator returned holds per-class IoU, a ``C×C`` confusion matrix and per-class boundary IoU.

    Args:
        metrics: What one evaluation pass returned (the object, or its dict / ``metrics.json``).
        num_classes: Number of classes ``C``.
        band_pixels: Boundary band width the evaluation used on the dataset's images (None: unknown).
    """
    name = "2.evaluation_outputs"
    data = metrics.to_dict() if isinstance(metrics, SegmentationMetrics) else dict(metrics)
    iou, confusion, boundary = data.get("iou"), data.get("confusion"), data.get("boundary_iou")
    missing = []
    if not isinstance(iou, list) or len(iou) != num_classes:
        missing.append(f"per-class IoU ({num_classes} values)")
    if (not isinstance(confusion, list) or len(confusion) != num_classes
            or any(not isinstance(row, list) or len(row) != num_classes for row in confusion)):
        missing.append(f"a {num_classes}×{num_classes} confusion matrix")
    elif sum(map(sum, confusion)) == 0:
        missing.append("a confusion matrix with counted pixels (it is all zero)")
    if not isinstance(boundary, list) or len(boundary) != num_classes:
        missing.append(f"per-class boundary IoU ({num_classes} values)")
    present = sorted(k for k in ("miou", "iou", "confusion", "boundary_iou", "mean_boundary_iou", "f1",
                                 "overall_accuracy") if data.get(k) is not None)
    details = {"reported": present, "band_pixels": band_pixels}
    if missing:
        return failed(name, f"reports {', '.join(present) or 'nothing'}", "missing " + "; ".join(missing),
                      "evaluate through mapsage_ds.evaluation.run_evaluation (confusion matrix + BoundaryIoU), "
                      "which validation and scripts/evaluate.py share", **details)
    figure = f"per-class IoU, {num_classes}×{num_classes} confusion, boundary IoU @ {band_pixels} px"
    low, high = BAND_PIXELS
    if band_pixels is not None and not low <= band_pixels <= high:
        return warned(name, figure, f"boundary IoU band is {band_pixels} px; the plan measures a {low}–{high} px band",
                      f"set eval.boundary_width={high} (and --boundary-width {high} for scripts/evaluate.py)",
                      **details)
    return passed(name, figure, "the evaluator reports per-class and boundary scores, not only a mean", **details)
