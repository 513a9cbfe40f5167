"""Cross-entropy with class weights and label smoothing, ignore-aware."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mapsage_ds.losses import functional as LF


class CrossEntropyLoss(nn.Module):
    """Mean pixel cross-entropy over the valid pixels.

    Args:
        ignore_index: Label excluded from the loss.
        class_weights: One weight per class (the mean becomes a weighted mean), or None.
        label_smoothing: Amount of uniform smoothing of the targets, in [0, 1).

    Shape:
        - logits: (N, C, h, w), resized to the target
        - target: (N, H, W)
        - output: scalar
    """

    def __init__(self, *, ignore_index: int = 255, class_weights: Sequence[float] | None = None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing
        # A plain attribute, not a buffer: module.to(bf16) must not round the weights, and they
        # stay out of checkpoints; the functional moves them to the logits' device.
        self.class_weights = None if class_weights is None else torch.tensor(list(class_weights), dtype=torch.float32)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of ``logits`` against ``target``."""
        return LF.cross_entropy(logits, target, ignore_index=self.ignore_index, class_weights=self.class_weights,
                                label_smoothing=self.label_smoothing)
