"""Check 3 (first half): the input normalisation matches the backbone's pretraining statistics.

The expected statistics are :func:`~mapsage_ds.models.normalization.decide_normalization`'s,
the same decision training makes: they follow the checkpoint's pretraining data (SAT-493M ->
satellite; LVD-1689M, ImageNet -> ImageNet) or ``model.normalization``. A DINOv3
``preprocessor_config.json`` is not trusted: transformers' converter writes ImageNet statistics
into it even for satellite checkpoints.
"""

from __future__ import annotations

from typing import Any

from mapsage_ds.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize
from mapsage_ds.errors import ConfigError
from mapsage_ds.health.result import CheckResult, failed, passed
from mapsage_ds.models.normalization import SATELLITE_MEAN, SATELLITE_STD, decide_normalization

_TOLERANCE = 1e-3
_NAME = "3.normalisation"


def expected_normalisation(*, arch: str, pretrained: str | None,
                           override: Any = None) -> tuple[tuple, tuple, str]:
    """Mean, std and why: the decision training makes for this architecture, checkpoint and override.

    Raises:
        ConfigError: a DINOv3 checkpoint of unknown pretraining data without an override.
    """
    if override is not None and not isinstance(override, dict):
        override = {"mean": override.mean, "std": override.std}
    decision = decide_normalization(arch=arch, pretrained=pretrained, override=override)
    return decision.mean, decision.std, decision.reason


def check_normalisation(*, arch: str, pretrained: str | None, normalize: Normalize,
                        override: Any = None) -> CheckResult:
    """The statistics the training pipeline normalises with equal the backbone's pretraining ones.

    Args:
        arch: ``segformer`` or ``dinov3``.
        pretrained: The local checkpoint, if any (its pretraining data decides).
        normalize: What the data pipeline and the predictor use.
        override: ``model.normalization`` ({mean, std} or an object with those attributes), if set.
    """
    used = f"mean {_fmt(normalize.mean)} std {_fmt(normalize.std)}"
    try:
        mean, std, source = expected_normalisation(arch=arch, pretrained=pretrained, override=override)
    except ConfigError as error:
        return failed(_NAME, used, str(error).splitlines()[0],
                      "set model.normalization: {mean: [...], std: [...]} to the statistics of the checkpoint's "
                      "pretraining data (see docs/weights.md)")
    details = {"used": {"mean": list(normalize.mean), "std": list(normalize.std)},
               "expected": {"mean": list(mean), "std": list(std)}, "source": source}
    if _distance((*normalize.mean, *normalize.std), (*mean, *std)) > _TOLERANCE:
        known = {"ImageNet": (IMAGENET_MEAN, IMAGENET_STD), "satellite": (SATELLITE_MEAN, SATELLITE_STD)}
        named = next((label for label, (m, s) in known.items()
                      if _distance((*normalize.mean, *normalize.std), (*m, *s)) <= _TOLERANCE), "other")
        return failed(_NAME, used, f"{named} statistics on a {arch} backbone whose expected statistics are "
                                   f"mean {_fmt(mean)} std {_fmt(std)} ({source})",
                      f"normalise with the pretraining statistics ({source})", **details)
    return passed(_NAME, used, f"matches {source}", **details)


def _distance(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"
