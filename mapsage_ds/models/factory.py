"""Build the model a config names, load its local starting weights, and describe its layers.

Under ZeRO-3 the model is built inside ``deepspeed.zero.Init`` with transformers' DeepSpeed
integration switched on, so every parameter is born as a shard and a 7B backbone never
materialises whole on one rank.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn
from transformers import SegformerForSemanticSegmentation

from mapsage_ds.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize
from mapsage_ds.errors import ConfigError, DataError, MissingFileError
from mapsage_ds.models.dinov3 import (
    HEAD_CONFIG,
    SATELLITE_MEAN,
    SATELLITE_STD,
    DINOv3Segmenter,
    dinov3_config,
    dinov3_layer_id,
    load_dinov3_export,
)
from mapsage_ds.models.segformer import segformer_config, segformer_layer_id
from mapsage_ds.models.weights import KeyReport, load_matching_weights

ARCHITECTURES = ("segformer", "dinov3")


@dataclass
class BuiltModel:
    """A segmentation network plus what the optimizer and data pipeline need to know about it.

    Attributes:
        module: maps ``pixel_values`` to an output with ``.logits``; this is what gets exported.
        num_layers: backbone depth; layer ids run 0..num_layers + 1 (the head is not counted).
        layer_id: parameter name (relative to ``module``) -> layer id, None for head parameters.
        normalize: the input normalisation of the backbone's pretraining.
        report: key report of the loaded weights, None when training from scratch.
    """

    module: nn.Module
    num_layers: int
    layer_id: Callable[[str], int | None]
    normalize: Normalize
    report: KeyReport | None


@contextlib.contextmanager
def zero3_construction(ds_config: dict[str, Any] | None) -> Iterator[None]:
    """Build parameters as ZeRO-3 shards when ``ds_config`` is stage 3; otherwise do nothing."""
    if ds_config is None or ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    hf_ds_config = HfDeepSpeedConfig(ds_config)  # must stay alive while transformers builds models
    try:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            yield
    finally:
        del hf_ds_config
        unset_hf_deepspeed_config()


def build_model(
    *,
    arch: str,
    size: str,
    class_names: list[str],
    pretrained: str | None = None,
    ds_config: dict[str, Any] | None = None,
    drop_path_rate: float = 0.1,
) -> BuiltModel:
    """The network for ``arch``/``size`` with one output per class, with local weights if given.

    Raises:
        ConfigError: unknown architecture or size.
        DataError: the weights match nothing (SegFormer) or miss backbone keys (DINOv3).
    """
    if arch == "segformer":
        return _build_segformer(size, class_names, pretrained, ds_config, drop_path_rate)
    if arch == "dinov3":
        return _build_dinov3(size, class_names, pretrained, ds_config, drop_path_rate)
    raise ConfigError(f"model.arch='{arch}': expected one of {', '.join(ARCHITECTURES)}")


def _build_segformer(size, class_names, pretrained, ds_config, drop_path_rate) -> BuiltModel:
    config = segformer_config(size, class_names)
    config.drop_path_rate = drop_path_rate
    with zero3_construction(ds_config):
        # _from_config runs HF weight initialisation, which plain construction under zero.Init skips.
        model = SegformerForSemanticSegmentation._from_config(config)
    report = load_matching_weights(model, pretrained) if pretrained else None
    if report is not None and not report.matched:
        raise DataError(f"model.pretrained={pretrained}: no tensor matched the model's keys\n{report.summary()}")
    return BuiltModel(model, sum(config.depths), partial(segformer_layer_id, depths=list(config.depths)),
                      Normalize(IMAGENET_MEAN, IMAGENET_STD), report)


def _build_dinov3(size, class_names, pretrained, ds_config, drop_path_rate) -> BuiltModel:
    config = dinov3_config(size, pretrained=pretrained, drop_path_rate=drop_path_rate)
    with zero3_construction(ds_config):
        model = DINOv3Segmenter(config, num_classes=len(class_names), pretrained=pretrained)
    report = None
    if pretrained is not None:
        report = model.backbone_report
        if report.missing:
            raise DataError(f"model.pretrained={pretrained}: backbone keys missing\n{report.summary()}")
    layers = config.num_hidden_layers
    return BuiltModel(model, layers, partial(dinov3_layer_id, num_layers=layers),
                      Normalize(SATELLITE_MEAN, SATELLITE_STD), report)


def enable_activation_checkpointing(module: nn.Module) -> int:
    """Turn on HF gradient checkpointing in every transformers model inside ``module``.

    Raises:
        ConfigError: when no part of ``module`` supports it.
    """
    models = [m for m in module.modules() if getattr(m, "supports_gradient_checkpointing", False)]
    if not models:
        raise ConfigError(f"train.activation_checkpointing: {type(module).__name__} does not support it")
    for model in models:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return len(models)


def load_exported(path: str | Path) -> tuple[nn.Module, Normalize]:
    """A model exported by this project, with the normalisation it was trained with."""
    path = Path(path)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        if not (path / name).is_file():
            raise MissingFileError(f"{path} is not a MapSage export: {name} is missing")
    if (path / HEAD_CONFIG).is_file():
        model = load_dinov3_export(path)
    else:
        model = SegformerForSemanticSegmentation.from_pretrained(str(path))
    processor = json.loads((path / "preprocessor_config.json").read_text())
    return model, Normalize(mean=tuple(processor["image_mean"]), std=tuple(processor["image_std"]))
