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

Boundary IoU (Cheng et al., 2021, "Boundary IoU: Improving Object-Centric Image Segmentation
Evaluation") is accumulated the same way, by :class:`BoundaryIoU`: per class, intersection and
union pixel counts of the ground-truth and predicted masks restricted to their inner boundary
bands (pixels of the mask within distance ``d`` of its contour), summed over the dataset and
across ranks before dividing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mapsage_ds.errors import ConfigError, DataError

__all__ = ["BoundaryIoU", "ConfusionMatrix", "SegmentationMetrics", "boundary_band", "boundary_width_for"]


@dataclass(frozen=True)
class ClassRow:
    """One class's scores (``boundary_iou`` None when not measured; ``pixels``: ground-truth pixels)."""

    name: str
    iou: float
    f1: float
    boundary_iou: float | None
    pixels: int


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
        boundary_iou: Per-class boundary IoU (Cheng et al., 2021), NaN for a class with no
            boundary pixel in ground truth or prediction; None when not measured.
        mean_boundary_iou: Mean of ``boundary_iou`` over the classes that are not NaN.
    """

    iou: list[float]
    f1: list[float]
    miou: float
    mean_f1: float
    overall_accuracy: float
    confusion: list[list[int]]
    class_names: list[str] | None = None
    boundary_iou: list[float] | None = None
    mean_boundary_iou: float | None = None

    def to_dict(self) -> dict:
        """Returns the metrics as a plain, JSON-friendly dict (NaN stays ``float('nan')``)."""
        return asdict(self)

    def format_table(self) -> str:
        """Renders a fixed-width text table of per-class and summary scores.

        One row per class (name, IoU %, F1 %, ground-truth pixel count, then boundary IoU %
        when measured), then rows for mIoU, mean F1, overall accuracy (and mean boundary IoU).
        NaN scores print as ``n/a``.

        Returns:
            The table, lines joined by newlines, without a trailing newline.
        """
        rows = self.class_rows()
        name_width = max([len("mean F1"), len("Class"), *(len(r.name) for r in rows)])
        count_width = max(len("Pixels"), *(len(str(r.pixels)) for r in rows)) if rows else 6

        measured = self.boundary_iou is not None
        name_width = max(name_width, len("mean BIoU")) if measured else name_width
        header = f"{'Class':<{name_width}}  {'IoU %':>7}  {'F1 %':>7}  {'Pixels':>{count_width}}"
        header += f"  {'BIoU %':>7}" if measured else ""
        rule = "-" * len(header)
        lines = [header, rule]
        for r in rows:
            line = f"{r.name:<{name_width}}  {percent(r.iou):>7}  {percent(r.f1):>7}  {r.pixels:>{count_width}}"
            lines.append(line + (f"  {percent(r.boundary_iou):>7}" if measured else ""))
        lines.append(rule)
        lines.append(f"{'mIoU':<{name_width}}  {percent(self.miou):>7}")
        lines.append(f"{'mean F1':<{name_width}}  {'':>7}  {percent(self.mean_f1):>7}")
        lines.append(f"{'OA':<{name_width}}  {percent(self.overall_accuracy):>7}")
        if self.mean_boundary_iou is not None:
            lines.append(f"{'mean BIoU':<{name_width}}  {percent(self.mean_boundary_iou):>7}")
        return "\n".join(lines)

    def class_rows(self) -> list[ClassRow]:
        """One row per class: the model behind the text table and the markdown report."""
        names = class_names_or_default(self.class_names, len(self.iou))
        boundary = self.boundary_iou or [None] * len(names)
        return [ClassRow(name, self.iou[i], self.f1[i], boundary[i], sum(self.confusion[i]))
                for i, name in enumerate(names)]


def class_names_or_default(names: list[str] | tuple[str, ...] | None, count: int) -> list[str]:
    """``names``, or ``class_0 .. class_{count-1}`` when a report carries none."""
    return list(names) if names else [f"class_{i}" for i in range(count)]


def percent(value: float | None) -> str:
    """A score as a percentage with two decimals; ``n/a`` for an undefined (NaN or missing) score."""
    return "n/a" if value is None or math.isnan(value) else f"{100.0 * value:.2f}"


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


# ----------------------------------------------------------------------------------------------
# Boundary IoU


def boundary_width_for(height: int, width: int, *, dilation_ratio: float) -> int:
    """Band width ``d`` in pixels: ``dilation_ratio`` of the image diagonal, at least 1.

    This is Cheng et al.'s default rule (``dilation_ratio=0.02``: 29 px on a 1024² tile).
    """
    return max(1, int(round(dilation_ratio * math.hypot(height, width))))


def boundary_band(mask: Tensor, width: int) -> Tensor:
    """Inner boundary band of binary masks: mask pixels within distance ``width`` of the contour.

    Distance is the chessboard distance (a pixel's 8 neighbours are at distance 1), and
    everything outside the image counts as outside the mask, so the image frame is a contour
    too; this is the reference implementation of Cheng et al. (2021): the mask minus its
    erosion by ``width`` iterations of a 3×3 structuring element inside a one-pixel zero border.

    Shape:
        - mask: ``[N, C, H, W]`` (or ``[N, H, W]``), bool.
        - output: same shape, bool.

    Args:
        mask: Binary masks.
        width: Band width ``d`` in pixels, >= 1.

    Returns:
        The band, ``mask & ~erode(mask, d)``.
    """
    if width < 1:
        raise ConfigError(f"boundary band width must be >= 1 pixel, got {width}")
    squeeze = mask.dim() == 3
    mask = mask.unsqueeze(1) if squeeze else mask
    x = F.pad(mask.to(torch.float32), (1, 1, 1, 1), value=0.0)
    # Erosion by a (2d+1)² square, separably: min over rows, then over columns. Max-pooling
    # pads with -inf, so beyond the zero border the image continues "inside", as in the reference.
    kernel = 2 * width + 1
    x = -F.max_pool2d(-x, kernel_size=(1, kernel), stride=1, padding=(0, width))
    x = -F.max_pool2d(-x, kernel_size=(kernel, 1), stride=1, padding=(width, 0))
    eroded = x[..., 1:-1, 1:-1] > 0.5
    band = mask & ~eroded
    return band.squeeze(1) if squeeze else band


class BoundaryIoU:
    """Per-class boundary IoU accumulated as intersection / union pixel counts on the device.

    For class ``c`` in each image, ``G`` = pixels labelled ``c`` and ``P`` = pixels predicted
    ``c``; ignored pixels belong to neither (so an edge of a no-data area is a contour of both
    masks and never penalises). The class then adds ``|G_d ∩ P_d|`` to its intersection and
    ``|G_d ∪ P_d|`` to its union, where ``X_d`` is :func:`boundary_band` of ``X``. Boundary IoU
    of the class is intersection over union of the sums, over the dataset and across ranks.

    Args:
        num_classes: Number of classes ``C``.
        ignore_index: Target value of pixels that never count.
        device: Device holding the counts.
        width: Band width ``d`` in pixels; when None, ``dilation_ratio`` of each image's diagonal.
        dilation_ratio: Band width as a fraction of the image diagonal (used when ``width`` is None).

    Raises:
        ConfigError: If ``num_classes`` is not positive, or the width settings are out of range.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        device: torch.device | str = "cpu",
        *,
        width: int | None = None,
        dilation_ratio: float = 0.02,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
        if width is not None and width < 1:
            raise ConfigError(f"boundary width must be >= 1 pixel, got {width}")
        if width is None and not 0.0 < dilation_ratio < 1.0:
            raise ConfigError(f"boundary dilation_ratio must lie in (0, 1), got {dilation_ratio}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.width = width
        self.dilation_ratio = dilation_ratio
        # Row 0: intersection, row 1: union, per class.
        self.counts = torch.zeros(2, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        """Zeroes the counts."""
        self.counts.zero_()

    def band_width(self, height: int, width: int) -> int:
        """The band width used for an image of this size."""
        if self.width is not None:
            return self.width
        return boundary_width_for(height, width, dilation_ratio=self.dilation_ratio)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Adds one batch.

        Shape:
            - pred: ``[N, H, W]`` integer class indices.
            - target: ``[N, H, W]`` integer labels or ``ignore_index``.

        Raises:
            DataError: If the shapes differ or are not ``[N, H, W]``.
        """
        if pred.shape != target.shape or pred.dim() != 3:
            raise DataError(
                f"boundary IoU needs pred and target of the same [N, H, W] shape, got "
                f"{tuple(pred.shape)} and {tuple(target.shape)}"
            )
        device = self.counts.device
        pred = pred.to(device=device, dtype=torch.int64)
        target = target.to(device=device, dtype=torch.int64)
        valid = (target != self.ignore_index).unsqueeze(1)
        classes = torch.arange(self.num_classes, device=device).view(1, -1, 1, 1)
        width = self.band_width(*target.shape[-2:])
        gt_band = boundary_band((target.unsqueeze(1) == classes) & valid, width)
        pred_band = boundary_band((pred.unsqueeze(1) == classes) & valid, width)
        self.counts[0] += (gt_band & pred_band).sum(dim=(0, 2, 3))
        self.counts[1] += (gt_band | pred_band).sum(dim=(0, 2, 3))

    def all_reduce(self) -> None:
        """Sums the counts over all ranks (a no-op without a process group); call once per pass."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.counts, op=torch.distributed.ReduceOp.SUM)

    def compute(self) -> tuple[list[float], float]:
        """Per-class boundary IoU (NaN where the union is empty) and its NaN-mean."""
        counts = self.counts.to(torch.float64)
        per_class = counts[0] / counts[1]
        return per_class.tolist(), torch.nanmean(per_class).item()
