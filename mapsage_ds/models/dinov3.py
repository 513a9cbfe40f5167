"""DINOv3 ViT backbone (HF ``DINOv3ViTModel``) with a segmentation head (``model.head``).

Patch tokens are taken from several intermediate layers, normalised with the backbone's final
norm, stripped of the CLS and register tokens, reshaped to (B, C, H/16, W/16) maps and decoded
into class logits at 1/4 of the input resolution by the fusion head (default), UPerNet with its
simple-feature-pyramid neck, or the linear probe (:mod:`mapsage_ds.models.decode_heads`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DINOv3ViTConfig, DINOv3ViTModel
from transformers.modeling_outputs import SemanticSegmenterOutput

from mapsage_ds.errors import ConfigError, MissingFileError
from mapsage_ds.models.decode_heads import FusionHead, build_vit_head, resolve_head
from mapsage_ds.models.normalization import SATELLITE_MEAN, SATELLITE_STD
from mapsage_ds.models.weights import KeyReport, load_safetensors

__all__ = ["DINOV3_PRESETS", "SATELLITE_MEAN", "SATELLITE_STD", "DINOv3Segmenter", "FusionHead", "dinov3_config",
           "dinov3_layer_id", "load_dinov3_export"]

# Satellite checkpoints (dinov3-*-pretrain-sat493m); the "test" preset is for unit tests only.
DINOV3_PRESETS: dict[str, dict] = {
    "test": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2),
    "vitl16": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   layerscale_value=1e-5),
    "vit7b16": dict(hidden_size=4096, intermediate_size=8192, num_hidden_layers=40, num_attention_heads=32,
                    layerscale_value=1e-5, use_gated_mlp=True, hidden_act="silu"),
}
PATCH_SIZE = 16
HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "mapsage_head.json"


# What the weights fix, and a named preset must agree with.
_CHECKED_FIELDS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "use_gated_mlp",
                   "patch_size", "num_register_tokens")


def dinov3_config(
    preset: str,
    *,
    pretrained: str | None = None,
    drop_path_rate: float = 0.0,
    checkpoint: DINOv3ViTConfig | None = None,
    source: str = "",
) -> DINOv3ViTConfig:
    """Backbone config: the checkpoint's own when given (``preset`` is then a cross-check or ``auto``), else a preset.

    Args:
        preset: ``auto`` or a name in :data:`DINOV3_PRESETS`.
        pretrained: an HF directory whose ``config.json`` is the checkpoint's config.
        drop_path_rate: stochastic depth of the fine-tuning run.
        checkpoint: the checkpoint's config (from :func:`~mapsage_ds.models.convert.sources.read_pretrained`).
        source: the checkpoint's path, for messages.

    RoPE coordinate augmentation (shift, jitter, rescale) is switched off: it was a pretraining
    augmentation, and with it two forwards of the same image differ in train mode.

    Raises:
        ConfigError: an unknown preset, ``auto`` without a checkpoint, or a preset that is not the checkpoint's.
    """
    overrides = dict(pos_embed_shift=None, pos_embed_jitter=None, pos_embed_rescale=None,
                     drop_path_rate=drop_path_rate)
    if checkpoint is None and pretrained is not None:
        config_file = Path(pretrained) / "config.json"
        if not config_file.is_file():
            raise MissingFileError(f"model.pretrained={pretrained}: no config.json; read the checkpoint with "
                                   f"mapsage_ds.models.convert.sources.read_pretrained")
        checkpoint, source = DINOv3ViTConfig.from_dict(json.loads(config_file.read_text())), pretrained
    if preset != "auto" and preset not in DINOV3_PRESETS:
        raise ConfigError(f"model.size='{preset}': expected auto or one of {', '.join(DINOV3_PRESETS)} for arch "
                          f"dinov3")
    if checkpoint is None:
        if preset == "auto":
            raise ConfigError("model.size='auto' takes the architecture from model.pretrained, which is not set")
        return DINOv3ViTConfig(**_preset_fields(preset), **overrides)
    if preset != "auto":
        expected = DINOv3ViTConfig(**_preset_fields(preset))
        differ = {f: (getattr(expected, f), getattr(checkpoint, f)) for f in _CHECKED_FIELDS
                  if getattr(expected, f) != getattr(checkpoint, f)}
        if differ:
            found = next((name for name in DINOV3_PRESETS if all(
                getattr(DINOv3ViTConfig(**_preset_fields(name)), f) == getattr(checkpoint, f)
                for f in _CHECKED_FIELDS)), None)
            described = ", ".join(f"{f} {theirs}" for f, (_, theirs) in differ.items())
            wanted = ", ".join(f"{f} {ours}" for f, (ours, _) in differ.items())
            raise ConfigError(f"model.size='{preset}' ({wanted}) but {source or 'the checkpoint'} has {described} "
                              f"({found or 'no preset'}); set model.size={found or 'auto'}")
    return DINOv3ViTConfig.from_dict({**checkpoint.to_dict(), **overrides})


def _preset_fields(preset: str) -> dict:
    return dict(patch_size=PATCH_SIZE, num_register_tokens=4, key_bias=False, **DINOV3_PRESETS[preset])


def default_feature_layers(num_layers: int, count: int = 4) -> list[int]:
    """``count`` evenly spaced layer indices ending with the last one (e.g. 24 -> 5, 11, 17, 23)."""
    step = num_layers // count
    return [num_layers - 1 - step * (count - 1 - i) for i in range(count)]


class DINOv3Segmenter(nn.Module):
    """DINOv3 ViT + a decode head; ``forward(pixel_values)`` returns ``.logits`` at 1/4 resolution.

    Inputs whose sides are not multiples of 16 are zero-padded (DINOv3 would silently floor
    them) and the logits are cropped back to the unpadded extent.

    Args:
        backbone_config: the ViT's config.
        num_classes: one output per class.
        feature_layers: the layers whose patch maps the head reads; None: four evenly spaced ones
            ending with the last (the linear probe: the last layer only).
        head: ``fusion``, ``upernet`` or ``linear`` (``auto``: fusion).
        head_channels: the head's hidden width; None: 256 for fusion, 512 for UPerNet.
        head_norm: ``batch`` or ``group`` normalisation in the fusion and UPerNet heads.
        pretrained: an HF backbone directory to load.
        dtype: load the backbone in, and cast the head to, this dtype.
    """

    def __init__(
        self,
        backbone_config: DINOv3ViTConfig,
        *,
        num_classes: int,
        feature_layers: list[int] | None = None,
        head: str = "fusion",
        head_channels: int | None = None,
        head_norm: str = "batch",
        pretrained: str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.backbone_report: KeyReport | None = None
        if pretrained is not None:
            # Loaded straight into ``dtype``: a 7B backbone never exists as a full fp32 copy.
            self.backbone, info = DINOv3ViTModel.from_pretrained(pretrained, config=backbone_config,
                                                                 output_loading_info=True,
                                                                 **({"dtype": dtype} if dtype else {}))
            self.backbone_report = _loading_report(pretrained, self.backbone, info)
        else:
            # _from_config runs HF weight initialisation (plain construction under zero.Init skips it).
            self.backbone = DINOv3ViTModel._from_config(backbone_config)
        layers = backbone_config.num_hidden_layers
        self.head_type, self.head_channels = resolve_head("dinov3", head, head_channels)
        self.head_norm = head_norm
        # The linear probe of DINOv2/DINOv3 reads the last layer only.
        default_layers = [layers - 1] if self.head_type == "linear" else default_feature_layers(layers)
        self.feature_layers = list(feature_layers or default_layers)
        if any(not 0 <= i < layers for i in self.feature_layers):
            raise ConfigError(f"model.feature_layers={self.feature_layers}: expected indices in 0..{layers - 1}")
        self.prefix_tokens = 1 + backbone_config.num_register_tokens
        self.num_classes = num_classes
        self.head = build_vit_head(self.head_type, hidden_size=backbone_config.hidden_size,
                                   levels=len(self.feature_layers), channels=self.head_channels,
                                   num_classes=num_classes, norm=head_norm)
        if dtype is not None:
            self.head.to(dtype)

    def head_config(self) -> dict:
        """What :func:`load_dinov3_export` needs to rebuild the head (``head_channels`` is null for linear)."""
        return {"arch": "dinov3", "num_classes": self.num_classes, "feature_layers": self.feature_layers,
                "head": self.head_type, "head_channels": self.head_channels, "head_norm": self.head_norm}

    def extract_features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Normalised patch-token maps (B, C, H/16, W/16) of the chosen layers (input already padded)."""
        batch, _, height, width = pixel_values.shape
        hidden = self.backbone(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        grid = (height // PATCH_SIZE, width // PATCH_SIZE)
        maps = []
        for index in self.feature_layers:
            tokens = self.backbone.norm(hidden[index + 1])[:, self.prefix_tokens:]  # hidden[0] is the embedding
            maps.append(tokens.transpose(1, 2).reshape(batch, -1, *grid))
        return maps

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> SemanticSegmenterOutput:
        height, width = pixel_values.shape[-2:]
        pad_h, pad_w = -height % PATCH_SIZE, -width % PATCH_SIZE
        padded = F.pad(pixel_values, (0, pad_w, 0, pad_h)) if pad_h or pad_w else pixel_values
        features = self.extract_features(padded)
        logits = self.head(features)
        logits = logits[..., : -(-height // 4), : -(-width // 4)]
        return SemanticSegmenterOutput(logits=logits, hidden_states=tuple(features) if output_hidden_states else None)


def load_dinov3_export(path: str | Path, *, dtype: torch.dtype | None = None) -> DINOv3Segmenter:
    """Rebuild a :class:`DINOv3Segmenter` from an export directory (backbone + head files), in ``dtype`` if given.

    Exports from before ``model.head`` existed carry no head type: theirs is the fusion head.
    """
    path = Path(path)
    head = json.loads((path / HEAD_CONFIG).read_text())
    config = DINOv3ViTConfig.from_pretrained(str(path))
    model = DINOv3Segmenter(config, num_classes=head["num_classes"], feature_layers=head["feature_layers"],
                            head=head.get("head", "fusion"), head_channels=head["head_channels"],
                            head_norm=head.get("head_norm", "batch"), pretrained=str(path), dtype=dtype)
    if model.backbone_report.missing or model.backbone_report.unexpected:
        raise MissingFileError(f"{path}: backbone weights incomplete\n{model.backbone_report.summary()}")
    model.head.load_state_dict(load_safetensors(path / HEAD_WEIGHTS), strict=True)
    return model


def _loading_report(source: str, model: nn.Module, info: dict) -> KeyReport:
    """KeyReport from transformers' loading info.

    Under ZeRO-3 transformers does not report unexpected keys, so they are recomputed from the
    checkpoint's own key list.
    """
    missing = sorted(info.get("missing_keys", []))
    mismatched = [(k, tuple(a), tuple(b)) for k, a, b in info.get("mismatched_keys", [])]
    unexpected = sorted(info.get("unexpected_keys", []))
    if not unexpected:
        from mapsage_ds.models.weights import checkpoint_keys

        expected = {_hub_name(k) for k in model.state_dict()}
        unexpected = sorted(k for k in checkpoint_keys(source) if _hub_name(k) not in expected)
    bad = set(missing) | {k for k, _, _ in mismatched}
    matched = [k for k in model.state_dict() if k not in bad]
    return KeyReport(source=source, matched=matched, missing=missing, unexpected=unexpected,
                     shape_mismatched=mismatched)


def _hub_name(key: str) -> str:
    """In memory DINOv3 blocks are ``model.layer.N``; checkpoints store ``layer.N``."""
    return key.removeprefix("model.")


_LAYER = re.compile(r"^backbone\.(?:model\.)?layer\.(\d+)\.")


def dinov3_layer_id(name: str, num_layers: int) -> int | None:
    """Layer id for layer-wise LR decay: embeddings 0, block i -> i + 1, final norm -> num_layers + 1.

    Returns None for head parameters (which are not part of the backbone).
    """
    if name.startswith("head."):
        return None
    if name.startswith("backbone.embeddings."):
        return 0
    match = _LAYER.match(name)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1  # backbone.norm and anything after the blocks
