"""Supervised semantic segmentation: model forward plus the composite loss at label resolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mapsage_ds.errors import ConfigError
from mapsage_ds.losses import CompositeLoss, build_loss


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize ``logits`` [N,C,h,w] to ``size`` (H, W); no-op when already there."""
    if logits.shape[-2:] == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class SegmentationTask(nn.Module):
    """Wraps a segmentation model, its loss and optional auxiliary heads; this module is what DeepSpeed wraps.

    ``self.model`` stays the plain segmentation model (it is what gets exported); an auxiliary
    boundary head sits beside it, is trained through the same engine, and is never used by
    :meth:`predict`, so it costs nothing at inference or export.

    Args:
        model: maps ``pixel_values`` [N,3,H,W] to an output with ``.logits`` [N,C,h,w] (and
            ``.hidden_states`` when called with ``output_hidden_states=True``, if a boundary
            head is given).
        ignore_index: label value excluded from the loss (used for the default loss).
        loss: the composite loss; plain cross-entropy when None.
        boundary_head: maps ``(hidden_states, image_size=)`` to boundary logits [N,1,h,w], or None.
    """

    def __init__(self, model: nn.Module, *, ignore_index: int = 255, loss: CompositeLoss | None = None,
                 boundary_head: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.ignore_index = ignore_index
        self.loss = loss if loss is not None else build_loss(ignore_index=ignore_index)
        self.boundary_head = boundary_head
        if self.loss.needs_boundary_logits and boundary_head is None:
            raise ConfigError("loss.boundary > 0 needs a boundary head: set model.boundary_head=true")

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [N,C,H,W] at the input resolution, in float32."""
        logits = self.model(pixel_values=images.to(self._dtype())).logits
        return upsample_logits(logits.float(), tuple(images.shape[-2:]))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss, its named parts and logits of a batch ``{"image": [N,3,H,W], "mask": [N,H,W]}``.

        A MixUp batch also carries ``"mask_mix"`` and ``"mix_lambda"`` (see data/mixing.py).

        Returns:
            ``{"loss", "logits", "loss_<part>", ...}``.
        """
        images = batch["image"]
        size = tuple(images.shape[-2:])
        boundary_logits = None
        if self.boundary_head is None:
            logits = self.predict(images)
        else:
            output = self.model(pixel_values=images.to(self._dtype()), output_hidden_states=True)
            logits = upsample_logits(output.logits.float(), size)
            boundary_logits = self.boundary_head(output.hidden_states, image_size=size).float()
        parts = self.loss(logits, batch["mask"], boundary_logits=boundary_logits,
                          mix_target=batch.get("mask_mix"), mix_lambda=batch.get("mix_lambda"))
        return {**parts, "logits": logits}
