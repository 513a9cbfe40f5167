"""Lovász-softmax loss (a convex surrogate of 1 − IoU), ignore-aware."""

from __future__ import annotations

import torch
from torch import nn

from mapsage_ds.losses import functional as LF


class LovaszSoftmaxLoss(nn.Module):
    """Lovász-softmax over the whole batch, averaged over the classes present in the target.

    Args:
        ignore_index: Label excluded from the loss.

    Shape:
        - logits: (N, C, h, w), resized to the target
        - target: (N, H, W)
        - output: scalar
    """

    def __init__(self, *, ignore_index: int = 255) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of ``logits`` against ``target``."""
        return LF.lovasz_softmax(logits, target, ignore_index=self.ignore_index)
