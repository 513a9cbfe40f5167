"""Check 3 (first half): the input normalisation matches the backbone's pretraining statistics."""

from __future__ import annotations

import json
from pathlib import Path

from mapsage_ds.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize
from mapsage_ds.health.result import CheckResult, failed, passed
from mapsage_ds.models.dinov3 import SATELLITE_MEAN, SATELLITE_STD

_TOLERANCE = 1e-3
PRETRAINING_STATS = {
    "segformer": (IMAGENET_MEAN, IMAGENET_STD, "ImageNet (SegFormer / MiT pretraining)"),
    "dinov3": (SATELLITE_MEAN, SATELLITE_STD, "DINOv3 satellite pretraining (SAT-493M)"),
}


def expected_normalisation(*, arch: str, pretrained: str | None) -> tuple[tuple, tuple, str]:
    """Mean, std and their source: the checkpoint's ``preprocessor_config.json`` if it has one, else the arch's.

    Raises:
        KeyError: for an architecture without known pretraining statistics.
    """
    if pretrained is not None:
        processor = Path(pretrained) / "preprocessor_config.json"
        if processor.is_file():
            data = json.loads(processor.read_text())
            if "image_mean" in data and "image_std" in data:
                return tuple(data["image_mean"]), tuple(data["image_std"]), str(processor)
    return PRETRAINING_STATS[arch]


def check_normalisation(*, arch: str, pretrained: str | None, normalize: Normalize) -> CheckResult:
    """The statistics the training pipeline normalises with equal the backbone's pretraining ones.

    Args:
        arch: ``segformer`` or ``dinov3``.
        pretrained: The local checkpoint, if any (its ``preprocessor_config.json`` wins).
        normalize: What the data pipeline and the predictor use.
    """
    name = "3.normalisation"
    mean, std, source = expected_normalisation(arch=arch, pretrained=pretrained)
    used = f"mean {_fmt(normalize.mean)} std {_fmt(normalize.std)}"
    details = {"used": {"mean": list(normalize.mean), "std": list(normalize.std)},
               "expected": {"mean": list(mean), "std": list(std)}, "source": source}
    off = max(abs(a - b) for a, b in zip((*normalize.mean, *normalize.std), (*mean, *std), strict=True))
    if off > _TOLERANCE:
        known = {label: stats for label, stats in (("ImageNet", (IMAGENET_MEAN, IMAGENET_STD)),
                                                  ("satellite", (SATELLITE_MEAN, SATELLITE_STD)))}
        named = next((label for label, (m, s) in known.items()
                      if max(abs(a - b) for a, b in zip((*normalize.mean, *normalize.std), (*m, *s))) <= _TOLERANCE),
                     "other")
        return failed(name, used, f"{named} statistics on a {arch} backbone pretrained with {source}: "
                                  f"expected mean {_fmt(mean)} std {_fmt(std)}",
                      f"normalise with the pretraining statistics ({source})", **details)
    return passed(name, used, f"matches {source}", **details)


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"
