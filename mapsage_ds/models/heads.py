"""Auxiliary heads trained beside a segmentation model: the boundary head.

The head reads the encoder features a model returns with ``output_hidden_states=True`` and
predicts a one-channel boundary map. It lives in the task, not in the model, so inference and
the export (the plain segmentation model) never see it.

Feature conventions it accepts, per selected hidden state:

- a map (B, C, h, w): SegFormer's stage outputs, or DINOv3Segmenter's normalised patch maps;
- a token sequence (B, T, C) of a ViT: the last ``(H/patch)·(W/patch)`` tokens are the patch grid
  (CLS and register tokens come first and are dropped).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mapsage_ds.errors import ConfigError


def as_feature_map(state: torch.Tensor, *, image_size: tuple[int, int], patch_size: int | None) -> torch.Tensor:
    """A hidden state as a (B, C, h, w) map (token sequences reshaped on the patch grid).

    Raises:
        ConfigError: For a token sequence when ``patch_size`` is unknown or the tokens do not fit the grid.
    """
    if state.dim() == 4:
        return state
    if state.dim() != 3 or patch_size is None:
        raise ConfigError(f"boundary head: cannot read a hidden state of shape {tuple(state.shape)} "
                          f"(patch_size={patch_size}); expected (B, C, h, w) maps or (B, T, C) ViT tokens")
    grid = (-(-image_size[0] // patch_size), -(-image_size[1] // patch_size))
    count = grid[0] * grid[1]
    if state.shape[1] < count:
        raise ConfigError(f"boundary head: {state.shape[1]} tokens cannot hold a {grid[0]}x{grid[1]} patch grid")
    return state[:, -count:].transpose(1, 2).reshape(state.shape[0], state.shape[2], *grid)


class BoundaryHead(nn.Module):
    """Fuses several encoder feature maps into boundary logits at the finest feature resolution.

    Each selected feature is projected to ``channels`` by a 1×1 convolution, upsampled to the
    finest map, concatenated, and fused by a 3×3 convolution, GroupNorm and ReLU into one logit
    per pixel. GroupNorm keeps it free of batch statistics (no buffers to sync across ranks).

    Args:
        in_channels: Channels of each selected feature.
        feature_indices: Which entries of ``hidden_states`` to use (one per ``in_channels``).
        channels: Width of the projections.
        patch_size: Patch size of a ViT whose hidden states are token sequences; None otherwise.

    Shape:
        - hidden_states: sequence of (B, C_i, h_i, w_i) maps or (B, T, C_i) tokens
        - output: (B, 1, h, w) with (h, w) the largest feature size
    """

    def __init__(self, in_channels: Sequence[int], *, feature_indices: Sequence[int], channels: int = 64,
                 patch_size: int | None = None) -> None:
        super().__init__()
        if len(in_channels) != len(feature_indices) or not in_channels:
            raise ConfigError(f"boundary head: {len(in_channels)} channel counts for feature indices "
                              f"{list(feature_indices)}; expected one per index")
        self.feature_indices, self.patch_size = list(feature_indices), patch_size
        self.projections = nn.ModuleList(nn.Conv2d(c, channels, kernel_size=1) for c in in_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(channels * len(in_channels), channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(min(8, channels), channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, 1, kernel_size=1),
        )

    def forward(self, hidden_states: Sequence[torch.Tensor], *, image_size: tuple[int, int]) -> torch.Tensor:
        """Boundary logits from a model's hidden states; ``image_size`` is the input's (H, W)."""
        if len(hidden_states) <= max(self.feature_indices):
            raise ConfigError(f"boundary head: the model returned {len(hidden_states)} hidden states; "
                              f"feature indices {self.feature_indices} need more")
        maps = [as_feature_map(hidden_states[i], image_size=image_size, patch_size=self.patch_size)
                for i in self.feature_indices]
        size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        projected = [F.interpolate(proj(m), size=size, mode="bilinear", align_corners=False)
                     if m.shape[-2:] != size else proj(m) for proj, m in zip(self.projections, maps)]
        return self.fuse(torch.cat(projected, dim=1))


def build_boundary_head(model: nn.Module, *, channels: int = 64) -> BoundaryHead:
    """A boundary head fitted to the features ``model`` returns with ``output_hidden_states=True``.

    Knows HF SegFormer (all four stage maps), this project's DINOv3 segmenter (its fused layers'
    patch maps), and any model declaring ``feature_channels`` (a list; all its hidden states are
    used, and an optional ``patch_size`` for token sequences).

    Raises:
        ConfigError: For a model whose features it cannot describe.
    """
    declared = getattr(model, "feature_channels", None)
    if declared is not None:
        channels_in = list(declared)
        return BoundaryHead(channels_in, feature_indices=range(len(channels_in)), channels=channels,
                            patch_size=getattr(model, "patch_size", None))
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) == "segformer":
        return BoundaryHead(config.hidden_sizes, feature_indices=range(len(config.hidden_sizes)), channels=channels)
    backbone = getattr(model, "backbone", None)
    layers = getattr(model, "feature_layers", None)
    if backbone is not None and layers is not None and hasattr(backbone.config, "hidden_size"):
        # DINOv3Segmenter returns one normalised (B, C, H/16, W/16) map per fused layer.
        return BoundaryHead([backbone.config.hidden_size] * len(layers), feature_indices=range(len(layers)),
                            channels=channels)
    raise ConfigError(f"model.boundary_head: no boundary head recipe for {type(model).__name__}; give the model a "
                      "`feature_channels` list describing its output_hidden_states")
