"""Build the model a config names, and load its local starting weights."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn
from transformers import SegformerForSemanticSegmentation

from mapsage_ds.data.transforms import Normalize

from mapsage_ds.errors import ConfigError, DataError, MissingFileError
from mapsage_ds.models.segformer import build_segformer
from mapsage_ds.models.weights import KeyReport, load_matching_weights


def build_model(
    *, arch: str, size: str, class_names: list[str], pretrained: str | None = None
) -> tuple[nn.Module, KeyReport | None]:
    """Model for ``arch``/``size`` with one output per class, plus the weight report if loaded."""
    if arch != "segformer":
        raise ConfigError(f"model.arch='{arch}': expected 'segformer'")
    model = build_segformer(size, class_names)
    report = load_matching_weights(model, pretrained) if pretrained else None
    if report is not None and not report.matched:
        raise DataError(f"model.pretrained={pretrained}: no tensor matched the model's keys\n{report.summary()}")
    return model, report


def load_exported(path: str | Path) -> tuple[nn.Module, Normalize]:
    """A model exported by this project, with the normalisation it was trained with."""
    path = Path(path)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        if not (path / name).is_file():
            raise MissingFileError(f"{path} is not a MapSage export: {name} is missing")
    model = SegformerForSemanticSegmentation.from_pretrained(str(path))
    processor = json.loads((path / "preprocessor_config.json").read_text())
    return model, Normalize(mean=tuple(processor["image_mean"]), std=tuple(processor["image_std"]))
