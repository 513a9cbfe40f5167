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

import torch
from torch import nn
from transformers import SegformerForSemanticSegmentation

from mapsage_ds.data.transforms import Normalize
from mapsage_ds.errors import ConfigError, MissingFileError
from mapsage_ds.models.decode_heads import HEAD_NORMS, resolve_head
from mapsage_ds.models.dinov3 import HEAD_CONFIG, DINOv3Segmenter, dinov3_config, dinov3_layer_id, load_dinov3_export
from mapsage_ds.models.normalization import (
    DECISION_FIELD,
    IDENTITY_FIELD,
    NormalizationDecision,
    decide_normalization,
)
from mapsage_ds.models.segformer import (
    HEAD_FIELD,
    SEGFORMER_SIZES,
    SegformerWithHead,
    segformer_config,
    segformer_config_from_checkpoint,
    segformer_layer_id,
)
from mapsage_ds.models.weights import KeyReport, check_safetensors, load_pretrained_state, to_module_names

ARCHITECTURES = ("segformer", "dinov3")


@dataclass
class BuiltModel:
    """A segmentation network plus what the optimizer and data pipeline need to know about it.

    Attributes:
        module: maps ``pixel_values`` to an output with ``.logits``; this is what gets exported.
        num_layers: backbone depth; layer ids run 0..num_layers + 1 (the head is not counted).
        layer_id: parameter name (relative to ``module``) -> layer id, None for head parameters.
        normalize: the input normalisation of the backbone's pretraining (``normalization.normalize``).
        report: key report of the loaded weights, None when training from scratch.
        normalization: the statistics and why they were chosen (printed, saved in the export).
    """

    module: nn.Module
    num_layers: int
    layer_id: Callable[[str], int | None]
    normalize: Normalize
    report: KeyReport | None
    normalization: NormalizationDecision | None = None


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
    normalization: Any = None,
    head: str = "auto",
    head_channels: int | None = None,
    head_norm: str = "batch",
    verbose: bool = False,
    strict: bool = True,
) -> BuiltModel:
    """The network for ``arch``/``size`` with one output per class, starting from local weights if given.

    ``pretrained`` is anything :func:`~mapsage_ds.models.convert.sources.read_pretrained` reads
    (HF directory, safetensors, NVlabs / mmsegmentation / Meta checkpoints); the architecture
    comes from it (``size="auto"``) or is cross-checked against ``size``. Every backbone tensor
    must load, under every ZeRO stage; head tensors that do not fit the class count are skipped
    and listed in the report.

    Args:
        arch: ``segformer`` or ``dinov3``.
        size: a named size / preset, or ``auto`` (with ``pretrained``).
        class_names: one output per class.
        pretrained: the local checkpoint, or None to train from scratch.
        ds_config: the filled DeepSpeed config; stage 3 builds the model born sharded.
        drop_path_rate: stochastic depth.
        normalization: ``model.normalization`` (``{mean, std}`` mapping or an object with those
            attributes) overriding the statistics of the checkpoint's pretraining data.
        head: ``auto`` (the architecture's own: DINOv3 fusion, SegFormer all-MLP), ``fusion``
            (DINOv3), ``upernet`` or ``linear`` (:mod:`~mapsage_ds.models.decode_heads`).
        head_channels: the head's hidden width; None: its default (fusion 256, UPerNet 512).
        head_norm: ``batch`` or ``group`` normalisation inside the fusion / UPerNet head.
        verbose: print the weight report and the normalisation decision (on the calling rank).
        strict: False only to inspect a checkpoint (the health check): a backbone that does not
            fit is then described in ``report`` instead of raised.

    Raises:
        ConfigError: unknown architecture or size, a size that is not the checkpoint's, an
            architecture that is not the checkpoint's, a head the architecture does not take, or
            a DINOv3 checkpoint of unknown pretraining data without ``normalization``.
        DataError: a backbone tensor is missing or shape-mismatched, or did not load exactly.
    """
    if arch not in ARCHITECTURES:
        raise ConfigError(f"model.arch='{arch}': expected one of {', '.join(ARCHITECTURES)}")
    if head_norm not in HEAD_NORMS:
        raise ConfigError(f"model.head_norm='{head_norm}': expected one of {', '.join(HEAD_NORMS)}")
    head_kind, channels = resolve_head(arch, head, head_channels)
    head_spec = {"type": head_kind, "channels": channels, "norm": head_norm}
    converted = None
    if pretrained is not None:
        from mapsage_ds.models.convert.sources import read_pretrained

        heads = SEGFORMER_SIZES.get(size, {}).get("num_attention_heads") if arch == "segformer" else None
        converted = read_pretrained(pretrained, num_attention_heads=heads)
        if converted.arch != arch:
            raise ConfigError(f"model.arch='{arch}' but model.pretrained={pretrained} is a {converted.arch} "
                              f"checkpoint ({converted.source_format} layout); set model.arch={converted.arch}")
    decision = decide_normalization(arch=arch, pretrained=pretrained, override=_as_override(normalization),
                                    checkpoint_pretraining=converted.pretraining if converted else None)
    if arch == "segformer":
        built = _build_segformer(size, class_names, pretrained, converted, ds_config, drop_path_rate, decision, strict,
                                 head_spec)
    else:
        built = _build_dinov3(size, class_names, pretrained, converted, ds_config, drop_path_rate, decision, strict,
                              head_spec)
    if verbose:
        if built.report is not None:
            print(built.report.summary(), flush=True)
            if converted is not None and converted.dropped:
                print(f"  not converted from {pretrained}: " + "; ".join(
                    f"{k} ({why})" for k, why in converted.dropped.items()), flush=True)
        print(decision.describe(), flush=True)
    return built


def _as_override(normalization: Any) -> dict[str, Any] | None:
    if normalization is None or isinstance(normalization, dict):
        return normalization
    return {"mean": getattr(normalization, "mean", None), "std": getattr(normalization, "std", None)}


def _record_identity(config: Any, decision: NormalizationDecision, identity: str | None) -> None:
    """Carry the pretraining identity and the normalisation decision in the HF config (and so the export)."""
    if identity is not None:
        setattr(config, IDENTITY_FIELD, identity)
    setattr(config, DECISION_FIELD, decision.to_dict())


def _build_segformer(size, class_names, pretrained, converted, ds_config, drop_path_rate, decision,
                     strict, head_spec) -> BuiltModel:
    if converted is None:
        if size == "auto":
            raise ConfigError("model.size='auto' takes the architecture from model.pretrained, which is not set")
        config = segformer_config(size, class_names)
    else:
        has_head = any(k.startswith("decode_head.") for k in converted.state_dict)
        config = segformer_config_from_checkpoint(size, class_names, converted.config, source=str(pretrained),
                                                  has_decode_head=has_head)
    config.drop_path_rate = drop_path_rate
    _record_identity(config, decision, converted.pretraining if converted else None)
    model_class = SegformerForSemanticSegmentation
    if head_spec["type"] != "auto":  # the project's head on the MiT stages, described in the config
        setattr(config, HEAD_FIELD, head_spec)
        model_class = SegformerWithHead
    with zero3_construction(ds_config):
        # _from_config runs HF weight initialisation, which plain construction under zero.Init skips.
        model = model_class._from_config(config)
    layer_id = partial(segformer_layer_id, depths=list(config.depths))
    report = None
    if converted is not None:
        state = to_module_names(converted.state_dict, model)
        report = load_pretrained_state(model, state, source=str(pretrained), is_head=head_test(layer_id),
                                       strict=strict)
    return BuiltModel(model, sum(config.depths), layer_id, decision.normalize, report, decision)


def _build_dinov3(size, class_names, pretrained, converted, ds_config, drop_path_rate, decision,
                  strict, head_spec) -> BuiltModel:
    config = dinov3_config(size, drop_path_rate=drop_path_rate, checkpoint=converted.config if converted else None,
                           source=str(pretrained))
    _record_identity(config, decision, converted.pretraining if converted else None)
    with zero3_construction(ds_config):
        # Born sharded under ZeRO-3: the backbone is built with _from_config inside zero.Init.
        model = DINOv3Segmenter(config, num_classes=len(class_names), head=head_spec["type"],
                                head_channels=head_spec["channels"], head_norm=head_spec["norm"])
    layers = config.num_hidden_layers
    layer_id = partial(dinov3_layer_id, num_layers=layers)
    report = None
    if converted is not None:
        state = to_module_names(converted.state_dict, model.backbone, prefix="backbone.")
        report = load_pretrained_state(model, state, source=str(pretrained), is_head=head_test(layer_id),
                                       strict=strict)
    return BuiltModel(model, layers, layer_id, decision.normalize, report, decision)


def head_test(layer_id: Callable[[str], int | None]) -> Callable[[str], bool]:
    """Whether a module name belongs to the head (no layer id), from the model's own layer numbering."""
    def is_head(name: str) -> bool:
        try:
            return layer_id(name) is None
        except ConfigError:  # a name outside the backbone's numbering is not a backbone tensor either
            return True

    return is_head


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


def load_exported(path: str | Path, *, dtype: torch.dtype | None = None) -> tuple[nn.Module, Normalize]:
    """A model exported by this project, with the normalisation it was trained with.

    ``dtype`` loads the weights straight into that dtype, tensor by tensor, so that a large
    model (a distillation teacher in bf16) never exists as a full fp32 copy; None keeps fp32.
    A DINOv3 export (``mapsage_head.json`` beside the backbone) rebuilds its head from that file;
    a SegFormer export whose ``config.json`` names a ``mapsage_head`` rebuilds that head.
    """
    path = Path(path)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        if not (path / name).is_file():
            raise MissingFileError(f"{path} is not a MapSage export: {name} is missing")
    check_safetensors(path)
    if (path / HEAD_CONFIG).is_file():
        model = load_dinov3_export(path, dtype=dtype)
    else:
        custom_head = HEAD_FIELD in json.loads((path / "config.json").read_text())
        model_class = SegformerWithHead if custom_head else SegformerForSemanticSegmentation
        model = model_class.from_pretrained(str(path), **({"dtype": dtype} if dtype else {}))
    processor = json.loads((path / "preprocessor_config.json").read_text())
    return model, Normalize(mean=tuple(processor["image_mean"]), std=tuple(processor["image_std"]))
