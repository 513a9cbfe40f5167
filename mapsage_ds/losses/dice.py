"""Soft multi-class Dice loss, ignore-aware."""

from __future__ import annotations

import torch
from torch import nn

from mapsage_ds.losses import functional as LF


class DiceLoss(nn.Module):
    """``1 − Dice`` of the softmax probabilities per class over the batch, averaged over present classes.

    Args:
        ignore_index: Label excluded from probabilities and targets alike.
        smooth: Added to numerator and denominator (0: the plain Dice coefficient).
        eps: Lower bound of the denominator.

    Shape:
        - logits: (N, C, h, w), resized to the target
        - target: (N, H, W)
        - output: scalar
    """

    def __init__(self, *, ignore_index: int = 255, smooth: float = 0.0, eps: float = 1e-7) -> None:
        super().__init__()
        self.ignore_index, self.smooth, self.eps = ignore_index, smooth, eps

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of ``logits`` against ``target``."""
        return LF.dice_loss(logits, target, ignore_index=self.ignore_index, smooth=self.smooth, eps=self.eps)
