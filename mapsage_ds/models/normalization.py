"""Which input statistics a backbone gets: they follow the identity of its pretraining data.

SAT-493M (DINOv3 satellite) -> satellite statistics; LVD-1689M (DINOv3 web) and ImageNet
(MiT / SegFormer) -> ImageNet statistics; ``model.normalization: {mean, std}`` overrides both.
The identity is read from what the checkpoint says about itself: the ``mapsage_pretraining``
field this project writes into ``config.json``, the hub name in ``_name_or_path``, or the
directory / file name (Meta's ``dinov3_vitl16_pretrain_sat493m-*.pth``, the hub's
``dinov3-vitl16-pretrain-lvd1689m``, the cache's ``models--facebook--...``). A DINOv3 checkpoint
that says nothing is an error asking for ``model.normalization``, never a guess.

A DINOv3 ``preprocessor_config.json`` is deliberately not trusted: transformers' converter
writes ImageNet statistics into it even for the satellite models.

Training, the export and the normalisation health check all call :func:`decide_normalization`,
so they cannot disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mapsage_ds.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize
from mapsage_ds.errors import ConfigError
from mapsage_ds.models.convert.common import PRETRAINING_IMAGENET, PRETRAINING_LVD1689M, PRETRAINING_SAT493M

SATELLITE_MEAN = (0.430, 0.411, 0.296)
SATELLITE_STD = (0.213, 0.156, 0.143)

# Pretraining identity -> (mean, std, label).
PRETRAINING_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...], str]] = {
    PRETRAINING_IMAGENET: (IMAGENET_MEAN, IMAGENET_STD, "ImageNet"),
    PRETRAINING_LVD1689M: (IMAGENET_MEAN, IMAGENET_STD, "ImageNet (DINOv3 web, LVD-1689M)"),
    PRETRAINING_SAT493M: (SATELLITE_MEAN, SATELLITE_STD, "satellite (DINOv3 SAT-493M)"),
}
# Field written into config.json by the converter and the export: the pretraining identity.
IDENTITY_FIELD = "mapsage_pretraining"
# Field written into preprocessor_config.json by the converter and the export: the decision.
DECISION_FIELD = "mapsage_normalization"
_CHANNELS = 3
_PARENT_LEVELS = 2


@dataclass(frozen=True)
class NormalizationDecision:
    """Input statistics and why they were chosen.

    Attributes:
        mean: per-channel mean of ``[0, 1]`` RGB.
        std: per-channel standard deviation.
        pretraining: the ``PRETRAINING_*`` identity behind the statistics; None for an override.
        reason: one line saying where the decision came from (printed, saved in the export).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    pretraining: str | None
    reason: str

    @property
    def normalize(self) -> Normalize:
        """The data pipeline's transform with these statistics."""
        return Normalize(self.mean, self.std)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what the export's ``preprocessor_config.json`` carries)."""
        return {"mean": list(self.mean), "std": list(self.std), "pretraining": self.pretraining,
                "reason": self.reason}

    def describe(self) -> str:
        """``normalisation: mean (...) std (...) <- reason``."""
        def fmt(values: tuple[float, ...]) -> str:
            return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"

        return f"normalisation: mean {fmt(self.mean)} std {fmt(self.std)} <- {self.reason}"


def pretraining_identity(pretrained: str | Path) -> tuple[str | None, str]:
    """What a local checkpoint says about its pretraining data, and where that was read.

    Reads only ``config.json`` and names (cheap even for a 7B checkpoint).

    Returns:
        (identity or None, where it was read; empty when nothing was found).
    """
    from mapsage_ds.models.convert.dinov3_meta import pretraining_from_name

    path = Path(pretrained)
    config_file = path / "config.json" if path.is_dir() else None
    if config_file is not None and config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError):
            config = {}
        if isinstance(config, dict):
            declared = config.get(IDENTITY_FIELD)
            if declared in PRETRAINING_STATS:
                return declared, f"from config.json of {path} ({IDENTITY_FIELD}: {declared})"
            hub_name = config.get("_name_or_path")
            if isinstance(hub_name, str) and (found := pretraining_from_name(hub_name)):
                return found, f"from config.json of {path} (_name_or_path {hub_name})"
    # The file or directory name, then the two folders above it (a hub cache: models--facebook--NAME/snapshots/HASH).
    for part in [path.name, *(parent.name for parent in list(path.resolve().parents)[:_PARENT_LEVELS])]:
        if part and (found := pretraining_from_name(part)):
            kind = "file name" if path.is_file() and part == path.name else "directory name"
            return found, f"from {kind} {part}"
    return None, ""


def decide_normalization(
    *,
    arch: str,
    pretrained: str | Path | None,
    override: dict[str, Any] | None = None,
    checkpoint_pretraining: str | None = None,
) -> NormalizationDecision:
    """The input statistics of a model: the override, else those of its pretraining data.

    Args:
        arch: ``segformer`` or ``dinov3``.
        pretrained: the local checkpoint (``model.pretrained``), or None when training from scratch.
        override: ``model.normalization`` as ``{"mean": [3 floats], "std": [3 floats]}``, or None.
        checkpoint_pretraining: an identity a converter read from the weights themselves, used
            when names and config say nothing.

    Raises:
        ConfigError: a malformed override, or a DINOv3 checkpoint of unknown pretraining data.
    """
    if override is not None:
        mean, std = _read_override(override)
        return NormalizationDecision(mean, std, None, "override (model.normalization)")
    if pretrained is None:
        if arch == "dinov3":
            # A from-scratch DINOv3 (tests, demos) keeps the toolkit's remote-sensing default.
            return _decision(PRETRAINING_SAT493M, "no pretrained weights: the DINOv3 default (satellite)")
        return _decision(PRETRAINING_IMAGENET, "no pretrained weights: the SegFormer default (ImageNet)")
    if arch == "segformer":
        return _decision(PRETRAINING_IMAGENET, f"MiT / SegFormer checkpoint {pretrained} (ImageNet pretraining)")
    identity, where = pretraining_identity(pretrained)
    if identity is None and checkpoint_pretraining is not None:
        identity, where = checkpoint_pretraining, f"from the tensors of {pretrained}"
    if identity is None:
        raise ConfigError(
            f"model.pretrained={pretrained}: cannot tell whether this DINOv3 checkpoint is satellite (SAT-493M) or "
            f"web (LVD-1689M): neither config.json ({IDENTITY_FIELD}, _name_or_path) nor its name says. Set "
            f"model.normalization: {{mean: [...], std: [...]}} (satellite {list(SATELLITE_MEAN)} / "
            f"{list(SATELLITE_STD)}, web {list(IMAGENET_MEAN)} / {list(IMAGENET_STD)}), or convert it with "
            f"mapsage-convert from a file whose name says sat493m or lvd1689m")
    return _decision(identity, where)


def _decision(identity: str, where: str) -> NormalizationDecision:
    mean, std, label = PRETRAINING_STATS[identity]
    return NormalizationDecision(tuple(mean), tuple(std), identity, f"{identity}: {label} statistics ({where})")


def _read_override(override: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    values = {}
    for key in ("mean", "std"):
        value = override.get(key)
        if (not isinstance(value, list | tuple) or len(value) != _CHANNELS
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)):
            raise ConfigError(f"model.normalization.{key}={value!r}: expected {_CHANNELS} numbers (RGB, in [0, 1] "
                              f"units)")
        values[key] = tuple(float(v) for v in value)
    if any(v <= 0 for v in values["std"]):
        raise ConfigError(f"model.normalization.std={list(values['std'])}: expected values > 0")
    return values["mean"], values["std"]
