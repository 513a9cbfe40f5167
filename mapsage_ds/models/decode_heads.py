"""Segmentation decode heads (``model.head``): fusion, UPerNet with its ViT neck, and the linear probe.

Every head maps a list of encoder feature maps to class logits at 1/4 of the (padded) input, so a
model answers at the same resolution whichever head it carries.

- ``fusion``: :class:`FusionHead`, this project's multi-level fusion head (the DINOv3 default).
- ``upernet``: :class:`UPerHead`, UPerNet (Xiao et al., 2018: a pyramid pooling module on the
  coarsest level, an FPN top-down path, all levels fused) as mmsegmentation's ``UPerHead``. A
  ViT's maps all lie at 1/16, so :class:`ViTUPerNetHead` first rescales four of them to 4×, 2×, 1×
  and ½× with :class:`FeaturePyramidNeck` (the ViTDet/BEiT "simple feature pyramid",
  mmsegmentation's ``Feature2Pyramid``).
- ``linear``: :class:`LinearHead`, the frozen-feature probe of DINOv2/DINOv3: BatchNorm and a 1×1
  convolution on the (upsampled, concatenated) feature maps.

Module and parameter names follow mmsegmentation's (``psp_modules``, ``lateral_convs``,
``fpn_convs``, ``fpn_bottleneck``, ``conv_seg``; ``conv``/``bn``/``gn`` inside each conv block;
``upsample_4x``, ``upsample_2x`` in the neck), so its UPerNet weights load by name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mapsage_ds.errors import ConfigError

__all__ = ["HEADS", "HEAD_NORMS", "FeaturePyramidNeck", "FusionHead", "LinearHead", "UPerHead", "ViTUPerNetHead",
           "build_pyramid_head", "build_vit_head", "resolve_head"]

HEADS = ("auto", "fusion", "upernet", "linear")
HEAD_NORMS = ("batch", "group")
# Heads each architecture accepts; ``auto`` is its own default (DINOv3: fusion; SegFormer: HF's all-MLP head).
ARCH_HEADS = {"dinov3": ("auto", "fusion", "upernet", "linear"), "segformer": ("auto", "upernet", "linear")}
# Hidden channels when model.head_channels is null: the fusion head's own, mmsegmentation's ViT UPerNet width.
DEFAULT_CHANNELS = {"fusion": 256, "upernet": 512}
GROUPS = 32  # GroupNorm groups (mmsegmentation's GN configs), fewer when the channels do not divide


def resolve_head(arch: str, head: str, channels: int | None) -> tuple[str, int | None]:
    """The head ``arch`` builds for ``model.head``/``model.head_channels``: (kind, hidden channels).

    ``auto`` resolves to ``fusion`` for DINOv3 and stays ``auto`` (HF's own decode head) for SegFormer;
    the linear probe has no hidden channels (None).

    Raises:
        ConfigError: a head the architecture does not take, channels for the linear probe, or channels <= 0.
    """
    allowed = ARCH_HEADS.get(arch, HEADS)
    if head not in allowed:
        own = " (SegFormer's own all-MLP decode head is model.head=auto)" if arch == "segformer" else ""
        raise ConfigError(f"model.head='{head}': expected one of {', '.join(allowed)} for arch {arch}{own}")
    kind = "fusion" if (head == "auto" and arch == "dinov3") else head
    if channels is not None and (kind in ("linear", "auto") or channels <= 0):
        raise ConfigError(f"model.head_channels={channels}: expected null for model.head={head} (its width is "
                          f"fixed) and a value > 0 for fusion or upernet")
    return kind, (channels or DEFAULT_CHANNELS[kind]) if kind in DEFAULT_CHANNELS else None


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(GROUPS, channels), channels)
    raise ConfigError(f"model.head_norm='{kind}': expected one of {', '.join(HEAD_NORMS)}")


class ConvNormAct(nn.Module):
    """Convolution (no bias), norm, activation: mmcv's ``ConvModule`` under its parameter names."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, norm: str,
                 act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.add_module("bn" if norm == "batch" else "gn", _norm(norm, out_channels))
        self.activate = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.bn if hasattr(self, "bn") else self.gn
        return self.activate(norm(self.conv(x)))


class FusionHead(nn.Module):
    """Project each level, upsample to 1/4 resolution, concatenate, fuse, classify.

    Shape:
        features: ``levels`` tensors (B, C_in, h, w) -> logits (B, num_classes, 4h, 4w)
    """

    def __init__(self, in_channels: int, levels: int, channels: int, num_classes: int, dropout: float = 0.1,
                 norm: str = "batch"):
        super().__init__()
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False), _norm(norm, channels), nn.GELU())
            for _ in range(levels)
        )
        self.fuse = nn.Sequential(nn.Conv2d(channels * levels, channels, 3, padding=1, bias=False),
                                  _norm(norm, channels), nn.GELU())
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        height, width = features[0].shape[-2] * 4, features[0].shape[-1] * 4
        projected = [
            F.interpolate(project(f), size=(height, width), mode="bilinear", align_corners=False)
            for project, f in zip(self.projections, features, strict=True)
        ]
        return self.classifier(self.dropout(self.fuse(torch.cat(projected, dim=1))))


class UPerHead(nn.Module):
    """UPerNet: PPM on the coarsest level, FPN laterals and top-down sums, all levels fused at the finest.

    As mmsegmentation's ``UPerHead`` (pool scales 1, 2, 3, 6; bilinear resizing without
    ``align_corners``; dropout 0.1 before the classifier).

    Shape:
        features: one (B, in_channels[i], h_i, w_i) map per level, finest first -> logits
        (B, num_classes, h_0, w_0)
    """

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int, *, norm: str = "batch",
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        top = self.in_channels[-1]
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvNormAct(top, channels, 1, norm=norm))
            for scale in pool_scales
        )
        self.bottleneck = ConvNormAct(top + len(pool_scales) * channels, channels, 3, norm=norm)
        self.lateral_convs = nn.ModuleList(ConvNormAct(c, channels, 1, norm=norm) for c in self.in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3, norm=norm) for _ in self.in_channels[:-1])
        self.fpn_bottleneck = ConvNormAct(len(self.in_channels) * channels, channels, 3, norm=norm)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    @property
    def classifier(self) -> nn.Conv2d:
        """The final 1×1 convolution (what the planner reads widths from)."""
        return self.conv_seg

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.in_channels):
            raise ConfigError(f"UPerNet head: {len(features)} feature maps for {len(self.in_channels)} levels")
        top = features[-1]
        pooled = [_resize(branch(top), top.shape[-2:]) for branch in self.psp_modules]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features, strict=False)]
        laterals.append(self.bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: each level adds the coarser one
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals, strict=False)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0], *(_resize(o, size) for o in outs[1:])], dim=1))
        return self.conv_seg(self.dropout(fused))


def _resize(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class FeaturePyramidNeck(nn.Module):
    """Four ViT maps of one stride to 4×, 2×, 1× and ½× of it (the ViTDet/BEiT simple feature pyramid).

    4×: transposed conv ×2, norm, GELU, transposed conv ×2; 2×: transposed conv ×2; 1×: identity;
    ½×: 2×2 max pooling (odd sides are floored, as in mmsegmentation's ``Feature2Pyramid``).

    Shape:
        features: four (B, C, h, w) maps -> (B, C, 4h, 4w), (B, C, 2h, 2w), (B, C, h, w), (B, C, h//2, w//2)
    """

    def __init__(self, channels: int, *, norm: str = "batch") -> None:
        super().__init__()
        self.upsample_4x = nn.Sequential(nn.ConvTranspose2d(channels, channels, 2, stride=2), _norm(norm, channels),
                                         nn.GELU(), nn.ConvTranspose2d(channels, channels, 2, stride=2))
        self.upsample_2x = nn.Sequential(nn.ConvTranspose2d(channels, channels, 2, stride=2))
        self.identity = nn.Identity()
        self.downsample_2x = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != 4:
            raise ConfigError(f"UPerNet neck: {len(features)} ViT layers; expected 4 (model feature layers)")
        ops = (self.upsample_4x, self.upsample_2x, self.identity, self.downsample_2x)
        return [op(f) for op, f in zip(ops, features, strict=True)]


class ViTUPerNetHead(nn.Module):
    """:class:`FeaturePyramidNeck` then :class:`UPerHead`: UPerNet on four 1/16 ViT maps, logits at 1/4.

    Shape:
        features: four (B, C, h, w) maps -> logits (B, num_classes, 4h, 4w)
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, *, norm: str = "batch") -> None:
        super().__init__()
        self.neck = FeaturePyramidNeck(in_channels, norm=norm)
        self.decode = UPerHead([in_channels] * 4, channels, num_classes, norm=norm)

    @property
    def classifier(self) -> nn.Conv2d:
        """The final 1×1 convolution."""
        return self.decode.conv_seg

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.decode(self.neck(features))


class LinearHead(nn.Module):
    """The linear probe: maps resized to the first one, concatenated, BatchNorm, 1×1 convolution.

    BatchNorm normalises over the batch and every pixel, so one image per card is enough. Logits
    are bilinearly upsampled by ``upsample`` (4 for 1/16 ViT maps) to the common 1/4 resolution.

    Shape:
        features: (B, C_i, h_i, w_i) maps, sum(C_i) = ``in_channels`` -> logits (B, num_classes,
        upsample·h_0, upsample·w_0)
    """

    def __init__(self, in_channels: int, num_classes: int, *, upsample: int = 1) -> None:
        super().__init__()
        self.upsample = upsample
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv_seg = nn.Conv2d(in_channels, num_classes, 1)

    @property
    def classifier(self) -> nn.Conv2d:
        """The final 1×1 convolution."""
        return self.conv_seg

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        x = torch.cat([f if f.shape[-2:] == size else _resize(f, size) for f in features], dim=1)
        logits = self.conv_seg(self.bn(x))
        if self.upsample == 1:
            return logits
        return F.interpolate(logits, scale_factor=self.upsample, mode="bilinear", align_corners=False)


def build_vit_head(kind: str, *, hidden_size: int, levels: int, channels: int | None, num_classes: int,
                   norm: str = "batch") -> nn.Module:
    """The head of a ViT whose ``levels`` layer maps (hidden_size channels, 1/16) it reads.

    Raises:
        ConfigError: an unknown head, or UPerNet on other than four layers.
    """
    if kind == "fusion":
        return FusionHead(hidden_size, levels, channels or DEFAULT_CHANNELS[kind], num_classes, norm=norm)
    if kind == "upernet":
        if levels != 4:
            raise ConfigError(f"model.head=upernet: its neck rescales 4 ViT layers to 4×, 2×, 1×, ½×; got {levels}")
        return ViTUPerNetHead(hidden_size, channels or DEFAULT_CHANNELS[kind], num_classes, norm=norm)
    if kind == "linear":
        return LinearHead(hidden_size * levels, num_classes, upsample=4)
    raise ConfigError(f"model.head='{kind}': expected one of fusion, upernet, linear for a ViT")


def build_pyramid_head(kind: str, *, in_channels: Sequence[int], channels: int | None, num_classes: int,
                       norm: str = "batch") -> nn.Module:
    """The head of a hierarchical encoder (SegFormer's MiT: four stages at 1/4 .. 1/32), logits at 1/4.

    Raises:
        ConfigError: a head other than upernet or linear.
    """
    if kind == "upernet":
        return UPerHead(in_channels, channels or DEFAULT_CHANNELS[kind], num_classes, norm=norm)
    if kind == "linear":
        return LinearHead(sum(in_channels), num_classes)
    raise ConfigError(f"model.head='{kind}': expected upernet or linear for a hierarchical encoder")
