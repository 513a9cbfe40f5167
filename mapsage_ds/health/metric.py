"""Check 7: the metric on a built case with known answers.

The case has every class, a background region, and ignored pixels on which the prediction says
"background" (the classic no-data-as-background bug scores them as correct background). The
answers are counted here pixel by pixel in plain Python, independently of the confusion matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from mapsage_ds.data.classes import IGNORE_INDEX, NUM_CLASSES
from mapsage_ds.evaluation.metrics import ConfusionMatrix, SegmentationMetrics
from mapsage_ds.health.result import CheckResult, failed, passed

MetricFn = Callable[[torch.Tensor, torch.Tensor], SegmentationMetrics | dict[str, Any]]
_TOLERANCE = 1e-9


def project_metric(pred: torch.Tensor, target: torch.Tensor) -> SegmentationMetrics:
    """The project's metric as evaluation uses it: a confusion matrix over 7 classes, ignore 255."""
    confusion = ConfusionMatrix(NUM_CLASSES, ignore_index=IGNORE_INDEX)
    confusion.update(pred, target)
    return confusion.compute()


def built_case(num_classes: int = NUM_CLASSES, ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, target) ``[1, 12, 16]``: stripes of every class, some wrong, a block of ignored pixels."""
    height, width = 12, 16
    target = torch.empty(height, width, dtype=torch.int64)
    for col in range(width):
        target[:, col] = col * num_classes // width
    pred = target.clone()
    pred[0:3, :] = (target[0:3, :] + 1) % num_classes  # a wrong band across all classes
    pred[5, 2:9] = 0  # a few pixels wrongly called background
    target[8:12, 10:16] = ignore_index  # no-data ...
    pred[8:12, 10:16] = 0  # ... predicted as background: must not count as correct background
    return pred.unsqueeze(0), target.unsqueeze(0)


def reference_scores(pred: torch.Tensor, target: torch.Tensor, *, num_classes: int,
                     ignore_index: int) -> tuple[list[float], float]:
    """Per-class IoU and mIoU counted pixel by pixel (classes absent from both are NaN and left out)."""
    tp, fp, fn = [0] * num_classes, [0] * num_classes, [0] * num_classes
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
        if t == ignore_index:
            continue
        if p == t:
            tp[t] += 1
        else:
            fp[p] += 1
            fn[t] += 1
    iou = [tp[c] / (tp[c] + fp[c] + fn[c]) if tp[c] + fp[c] + fn[c] else math.nan for c in range(num_classes)]
    present = [v for v in iou if not math.isnan(v)]
    return iou, sum(present) / len(present)


def _scores(result: SegmentationMetrics | dict[str, Any]) -> tuple[list[float], float]:
    data = result.to_dict() if isinstance(result, SegmentationMetrics) else dict(result)
    return list(data["iou"]), float(data["miou"])


def check_metric(metric: MetricFn, *, num_classes: int = NUM_CLASSES, ignore_index: int = IGNORE_INDEX) -> CheckResult:
    """``metric(pred, target)`` gives the known answers of :func:`built_case`.

    Verified: one IoU per class (background counted once, no extra no-data class); predictions
    on ignored pixels change nothing; per-class IoU and mIoU equal the pixel-by-pixel count.
    """
    name = "7.metric_correctness"
    pred, target = built_case(num_classes, ignore_index)
    expected_iou, expected_miou = reference_scores(pred, target, num_classes=num_classes, ignore_index=ignore_index)
    iou, miou = _scores(metric(pred, target))
    other = pred.clone()
    ignored = target == ignore_index
    other[ignored] = (torch.arange(int(ignored.sum())) % num_classes)  # other predictions on ignored pixels only
    iou_other, miou_other = _scores(metric(other, target))
    problems = []
    if len(iou) != num_classes:
        problems.append(f"{len(iou)} per-class IoU values for {num_classes} classes (no-data or background "
                        "counted as an extra class?)")
    if abs(miou - miou_other) > _TOLERANCE or iou != iou_other:
        problems.append(f"predictions on ignored pixels change the scores (mIoU {miou:.4f} vs {miou_other:.4f})")
    if len(iou) == num_classes and any(abs(a - b) > _TOLERANCE for a, b in zip(iou, expected_iou)):
        worst = max(range(num_classes), key=lambda c: abs(iou[c] - expected_iou[c]))
        problems.append(f"class {worst} IoU {iou[worst]:.4f}, expected {expected_iou[worst]:.4f}")
    if not abs(miou - expected_miou) <= _TOLERANCE:
        problems.append(f"mIoU {miou:.4f}, expected {expected_miou:.4f}")
    figure = f"mIoU {miou:.4f} vs independent {expected_miou:.4f}"
    details = {"miou": miou, "expected_miou": expected_miou, "iou": iou, "expected_iou": expected_iou}
    if problems:
        return failed(name, figure, "; ".join(problems),
                      "drop ignored pixels before counting, keep one background class, and take mIoU as the mean "
                      "over classes of dataset-level IoU (mapsage_ds.metrics.ConfusionMatrix)", **details)
    return passed(name, figure, "ignored pixels never count, background counted once, mIoU matches", **details)
