"""Boundary loss: a boundary map predicted by an auxiliary head against edges derived from the labels."""

from __future__ import annotations

import torch
from torch import nn

from mapsage_ds.losses import functional as LF


class BoundaryLoss(nn.Module):
    """Class-balanced BCE between boundary logits and the label map's class boundaries.

    Targets come from :func:`~mapsage_ds.losses.functional.boundary_targets`: a valid pixel is
    a boundary when another valid label lies within ``radius`` pixels; ignored pixels never count.

    Args:
        ignore_index: Label of ignored pixels.
        radius: Half-width of the boundary band in label pixels.

    Shape:
        - boundary_logits: (N, 1, h, w), resized to the target
        - target: (N, H, W) class labels
        - output: scalar
    """

    def __init__(self, *, ignore_index: int = 255, radius: int = 1) -> None:
        super().__init__()
        self.ignore_index, self.radius = ignore_index, radius

    def forward(self, boundary_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of ``boundary_logits`` against the boundaries of ``target``."""
        edges = LF.boundary_targets(target, ignore_index=self.ignore_index, radius=self.radius)
        return LF.balanced_boundary_bce(boundary_logits, edges, ignore_index=self.ignore_index)
