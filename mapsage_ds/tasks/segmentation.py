"""Supervised semantic segmentation: model forward plus loss at label resolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize ``logits`` [N,C,h,w] to ``size`` (H, W); no-op when already there."""
    if logits.shape[-2:] == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class SegmentationTask(nn.Module):
    """Wraps a segmentation model and its loss; this module is what DeepSpeed wraps.

    Args:
        model: maps ``pixel_values`` [N,3,H,W] to an output with ``.logits`` [N,C,h,w].
        ignore_index: label value excluded from the loss.
    """

    def __init__(self, model: nn.Module, *, ignore_index: int = 255) -> None:
        super().__init__()
        self.model = model
        self.ignore_index = ignore_index

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [N,C,H,W] at the input resolution, in float32."""
        dtype = next(self.model.parameters()).dtype
        logits = self.model(pixel_values=images.to(dtype)).logits
        return upsample_logits(logits.float(), tuple(images.shape[-2:]))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss and logits of a batch ``{"image": [N,3,H,W], "mask": [N,H,W]}``."""
        logits = self.predict(batch["image"])
        loss = F.cross_entropy(logits, batch["mask"], ignore_index=self.ignore_index)
        return {"loss": loss, "logits": logits}
