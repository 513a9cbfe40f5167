"""Semantic-segmentation metrics accumulated in a confusion matrix.

Every rank accumulates a ``[C, C]`` confusion matrix on its own device, the matrices are
summed across ranks once at the end of evaluation, and per-class IoU / F1 are derived from
that single matrix. mIoU is therefore the mean over classes of the dataset-level IoU of each
class: never a micro-averaged Jaccard, never an average of per-batch scores.

Conventions:
    * Rows index the ground-truth class, columns the predicted class.
    * Pixels whose target equals ``ignore_index`` are dropped before counting.
    * A class with no ground-truth pixels *and* no predicted pixels has IoU and F1 of NaN
      and is left out of ``miou`` and ``mean_f1`` (a NaN-mean), because there is nothing to
      score it on. A class that is predicted but absent from the ground truth scores 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from mapsage_ds.errors import ConfigError, DataError

__all__ = ["ConfusionMatrix", "SegmentationMetrics"]


@dataclass
class SegmentationMetrics:
    """Scores derived from a confusion matrix.

    Attributes:
        iou: Per-class intersection over union, ``TP / (TP + FP + FN)``; NaN for a class
            absent from both ground truth and prediction.
        f1: Per-class F1 (Dice), ``2TP / (2TP + FP + FN)``; NaN under the same rule.
        miou: Mean of ``iou`` over the classes that are not NaN.
        mean_f1: Mean of ``f1`` over the classes that are not NaN.
        overall_accuracy: Correct pixels over all non-ignored pixels.
        confusion: The ``[C, C]`` pixel counts, rows = ground truth, columns = prediction.
        class_names: Optional display names, one per class.
    """

    iou: list[float]
    f1: list[float]
    miou: float
    mean_f1: float
    overall_accuracy: float
    confusion: list[list[int]]
    class_names: list[str] | None = None

    def to_dict(self) -> dict:
        """Returns the metrics as a plain, JSON-friendly dict (NaN stays ``float('nan')``)."""
        return asdict(self)

    def format_table(self) -> str:
        """Renders a fixed-width text table of per-class and summary scores.

        One row per class (name, IoU %, F1 %, ground-truth pixel count), then rows for mIoU,
        mean F1 and overall accuracy. NaN scores print as ``n/a``.

        Returns:
            The table, lines joined by newlines, without a trailing newline.
        """
        names = self.class_names or [f"class_{i}" for i in range(len(self.iou))]
        gt_pixels = [sum(row) for row in self.confusion]
        name_width = max([len("mean F1"), len("Class"), *(len(n) for n in names)])
        count_width = max(len("Pixels"), *(len(str(c)) for c in gt_pixels)) if gt_pixels else 6

        header = f"{'Class':<{name_width}}  {'IoU %':>7}  {'F1 %':>7}  {'Pixels':>{count_width}}"
        rule = "-" * len(header)
        lines = [header, rule]
        for name, iou, f1, count in zip(names, self.iou, self.f1, gt_pixels):
            lines.append(
                f"{name:<{name_width}}  {_percent(iou):>7}  {_percent(f1):>7}  {count:>{count_width}}"
            )
        lines.append(rule)
        lines.append(f"{'mIoU':<{name_width}}  {_percent(self.miou):>7}")
        lines.append(f"{'mean F1':<{name_width}}  {'':>7}  {_percent(self.mean_f1):>7}")
        lines.append(f"{'OA':<{name_width}}  {_percent(self.overall_accuracy):>7}")
        return "\n".join(lines)


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100.0 * value:.2f}"


class ConfusionMatrix:
    """A ``[C, C]`` int64 confusion matrix accumulated on the device.

    Typical use: ``update`` once per batch on every rank, ``all_reduce`` once after the
    loop, then ``compute``. ``all_reduce`` sums in place, so calling it twice double-counts.

    Args:
        num_classes: Number of classes ``C``; labels are ``0..C-1``.
        ignore_index: Target value of pixels that never count.
        device: Device holding the matrix; updates are moved onto it.
        class_names: Optional display names, one per class, passed through to the metrics.

    Raises:
        ConfigError: If ``num_classes`` is not a positive integer or ``class_names`` has
            the wrong length.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        device: torch.device | str = "cpu",
        class_names: Sequence[str] | None = None,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(
                f"class_names has {len(class_names)} entries but num_classes is {num_classes}: "
                f"{list(class_names)!r}"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        """The device holding the matrix."""
        return self.matrix.device

    def reset(self) -> None:
        """Zeroes the matrix, e.g. before a new evaluation pass."""
        self.matrix.zero_()

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Adds one batch of predictions to the matrix.

        Shape:
            - pred: any shape, e.g. ``[N, H, W]``, integer class indices.
            - target: same shape as ``pred``, integer labels or ``ignore_index``.

        Args:
            pred: Predicted class per pixel (e.g. ``logits.argmax(1)``).
            target: Ground-truth class per pixel.

        Raises:
            DataError: If the shapes differ, a tensor is not integer-typed, a non-ignored
                target lies outside ``0..C-1``, or a prediction at a non-ignored pixel does.
        """
        if pred.shape != target.shape:
            raise DataError(
                f"pred and target shapes differ: pred {tuple(pred.shape)}, target {tuple(target.shape)}"
            )
        for name, tensor in (("pred", pred), ("target", target)):
            if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
                raise DataError(f"{name} must hold integer class indices, got dtype {tensor.dtype}")

        pred = pred.to(device=self.device, dtype=torch.int64).reshape(-1)
        target = target.to(device=self.device, dtype=torch.int64).reshape(-1)
        keep = target != self.ignore_index
        self._check_range(pred, target, keep)

        # Ignored pixels go to one spare bin that is dropped afterwards; masking them out
        # with boolean indexing instead would force a host sync to size the result.
        num_cells = self.num_classes**2
        cell = torch.where(keep, target * self.num_classes + pred, num_cells)
        counts = torch.bincount(cell, minlength=num_cells + 1)[:num_cells]
        self.matrix += counts.view(self.num_classes, self.num_classes)

    def _check_range(self, pred: Tensor, target: Tensor, keep: Tensor) -> None:
        # One combined .any() keeps the host sync to a single scalar on the happy path; the
        # offending values are only gathered once we already know we are going to raise.
        bad_target = keep & ((target < 0) | (target >= self.num_classes))
        bad_pred = keep & ((pred < 0) | (pred >= self.num_classes))
        if not bool((bad_target | bad_pred).any()):
            return
        problems = []
        if bool(bad_target.any()):
            values = torch.unique(target[bad_target]).tolist()
            problems.append(
                f"target values {values} are outside 0..{self.num_classes - 1} "
                f"and not ignore_index {self.ignore_index}"
            )
        if bool(bad_pred.any()):
            values = torch.unique(pred[bad_pred]).tolist()
            problems.append(
                f"pred values {values} at non-ignored pixels are outside 0..{self.num_classes - 1}"
            )
        raise DataError("; ".join(problems))

    def all_reduce(self) -> None:
        """Sums the matrix over all ranks of the default process group, in place.

        A no-op when ``torch.distributed`` is not initialised. Every rank must call it,
        exactly once per evaluation pass.
        """
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.matrix, op=torch.distributed.ReduceOp.SUM)

    def compute(self) -> SegmentationMetrics:
        """Derives per-class and mean scores from the accumulated matrix.

        Computed in float64. Classes with no ground-truth and no predicted pixels get NaN
        IoU/F1 and are excluded from ``miou`` and ``mean_f1``; if every class is NaN (an
        empty matrix), the means and overall accuracy are NaN too.

        Returns:
            The metrics, as plain Python numbers.
        """
        matrix = self.matrix.to(dtype=torch.float64)
        tp = matrix.diagonal()
        fp = matrix.sum(dim=0) - tp
        fn = matrix.sum(dim=1) - tp
        # A zero denominator only happens for a class absent from both target and
        # prediction; 0/0 yields the NaN that nanmean then skips.
        iou = tp / (tp + fp + fn)
        f1 = 2 * tp / (2 * tp + fp + fn)
        overall_accuracy = tp.sum() / matrix.sum()
        return SegmentationMetrics(
            iou=iou.tolist(),
            f1=f1.tolist(),
            miou=torch.nanmean(iou).item(),
            mean_f1=torch.nanmean(f1).item(),
            overall_accuracy=overall_accuracy.item(),
            confusion=self.matrix.tolist(),
            class_names=list(self.class_names) if self.class_names is not None else None,
        )
