"""Online hard-example mining cross-entropy (OHEM), ignore-aware."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mapsage_ds.losses import functional as LF
from mapsage_ds.losses.cross_entropy import CrossEntropyLoss


class OhemCrossEntropyLoss(CrossEntropyLoss):
    """Cross-entropy over the hard pixels only (see :func:`~mapsage_ds.losses.functional.ohem_keep_mask`).

    Args:
        thresh: A valid pixel is hard when its true-class probability is below this.
        min_kept: At least this many pixels per image are kept (the lowest-probability ones).
        ignore_index: Label never kept.
        class_weights: One weight per class, or None.
        label_smoothing: Amount of uniform smoothing of the targets.

    Shape:
        - logits: (N, C, h, w), resized to the target
        - target: (N, H, W)
        - output: scalar
    """

    def __init__(self, *, thresh: float, min_kept: int, ignore_index: int = 255,
                 class_weights: Sequence[float] | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__(ignore_index=ignore_index, class_weights=class_weights, label_smoothing=label_smoothing)
        self.thresh, self.min_kept = thresh, min_kept

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of ``logits`` against ``target``."""
        return LF.ohem_cross_entropy(logits, target, ignore_index=self.ignore_index, thresh=self.thresh,
                                     min_kept=self.min_kept, class_weights=self.class_weights,
                                     label_smoothing=self.label_smoothing)
