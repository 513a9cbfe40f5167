"""Every checkpoint source users hold, read into one HF-layout :class:`ConvertedWeights`.

``read_pretrained`` is what ``model.pretrained=`` and ``mapsage-convert`` both call:

- a Hugging Face directory (``config.json`` + ``model.safetensors``, a sharded index or
  ``pytorch_model.bin``): passed through after checking that its tensors are the layout its
  ``model_type`` promises;
- a bare ``.safetensors`` file, or a ``.pth``/``.pt``/``.bin`` pickle (read through the allow-list
  of :mod:`~mapsage_ds.models.convert.safe_pickle`, never a full unpickle): the layout is detected
  from the keys -- NVlabs MiT/SegFormer, mmsegmentation 0.x/1.x (bare backbone, ``backbone.`` /
  ``decode_head.`` segmentor, or training checkpoint), HF SegFormer, Meta DINOv3.

``write_hf_directory`` writes the result as a plain HF directory with the input statistics
decided by :mod:`mapsage_ds.models.normalization` in ``preprocessor_config.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from mapsage_ds.errors import ConfigError, DataError, MissingFileError
from mapsage_ds.models.convert.common import PRETRAINING_IMAGENET, ConvertedWeights, list_names

if TYPE_CHECKING:
    from mapsage_ds.models.normalization import NormalizationDecision

_MODEL_TYPES = {"segformer": "segformer", "dinov3_vit": "dinov3"}


def read_pretrained(path: str | Path, *, num_attention_heads: list[int] | None = None) -> ConvertedWeights:
    """The checkpoint at ``path`` in HF layout, with its architecture read from the checkpoint.

    Args:
        path: an HF directory, a ``.safetensors`` file, or a ``.pth``/``.pt``/``.bin`` checkpoint.
        num_attention_heads: MiT head count per stage, which the weights cannot tell (default: the
            checkpoint's config.json, else the published MiT value).

    Raises:
        MissingFileError: ``path`` (or a file an HF directory needs) does not exist.
        DataError: the file cannot be read safely, or its keys are no layout this project knows.
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"pretrained weights not found: {path}")
    if path.is_dir():
        return _read_hf_directory(path)
    from mapsage_ds.models.weights import read_state_dict

    return _convert_state(read_state_dict(path), path, num_attention_heads=num_attention_heads)


def _read_hf_directory(path: Path) -> ConvertedWeights:
    from mapsage_ds.models.normalization import pretraining_identity
    from mapsage_ds.models.weights import read_state_dict

    config_file = path / "config.json"
    if not config_file.is_file():
        raise MissingFileError(f"{path}: an HF model directory needs config.json (for a bare state dict, point "
                               f"model.pretrained at the weights file itself)")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError) as error:
        raise DataError(f"{config_file}: not a valid HF config: {error}") from error
    arch = _MODEL_TYPES.get(model_type)
    if arch is None:
        raise DataError(f"{config_file}: model_type {model_type!r} is not one this project trains "
                        f"(expected one of {', '.join(_MODEL_TYPES)})")
    state = read_state_dict(path)
    if arch == "segformer":
        from transformers import SegformerConfig

        config = SegformerConfig.from_pretrained(str(path))
        expected = ("segformer.",)
        pretraining = PRETRAINING_IMAGENET
    else:
        from transformers import DINOv3ViTConfig

        config = DINOv3ViTConfig.from_pretrained(str(path))
        expected = ("embeddings.", "layer.", "model.layer.", "norm.")
        pretraining = pretraining_identity(path)[0]
    foreign = [k for k in state if not k.startswith(expected)]
    if arch == "segformer":  # classification (mit-b*) and segmentation (ADE) heads are the two HF heads
        foreign = [k for k in foreign if not k.startswith(("decode_head.", "classifier."))]
    if foreign:
        raise DataError(f"{path}: config.json says {model_type} but {len(foreign)} tensor(s) are not in its HF "
                        f"layout: {list_names(foreign)}")
    return ConvertedWeights(arch=arch, config=config, state_dict=state, source_format="hf",
                            pretraining=pretraining)


def _convert_state(state: dict[str, torch.Tensor], path: Path, *,
                   num_attention_heads: list[int] | None) -> ConvertedWeights:
    from mapsage_ds.models.convert.dinov3_meta import convert_meta_dinov3, is_meta_dinov3, pretraining_from_name
    from mapsage_ds.models.convert.mit import convert_mit, detect_mit_format

    if is_meta_dinov3(state):
        return convert_meta_dinov3(state, pretraining=pretraining_from_name(path.name), source=str(path))
    if detect_mit_format(state) is not None:
        converted = convert_mit(state, num_attention_heads=num_attention_heads, source=str(path))
        if converted.pretraining is None:
            converted.pretraining = PRETRAINING_IMAGENET
        return converted
    if any(k.startswith(("embeddings.patch_embeddings", "layer.0.")) for k in state):
        raise DataError(f"{path}: HF-layout DINOv3 tensors without their config.json; point model.pretrained at "
                        f"the HF directory (config.json + model.safetensors) instead")
    raise DataError(f"{path}: the keys match no known layout (HF SegFormer, NVlabs or mmsegmentation MiT / "
                    f"SegFormer, Meta DINOv3); first keys: {list_names(list(state))}")



def write_hf_directory(converted: ConvertedWeights, dst: str | Path, *, normalization: NormalizationDecision) -> None:
    """Write ``converted`` as a plain HF directory: config.json, model.safetensors, preprocessor_config.json.

    ``config.json`` carries the pretraining identity (``mapsage_pretraining``) so that the
    directory's normalisation is known when it is used later; ``preprocessor_config.json`` holds
    the statistics and, under ``mapsage_normalization``, why. Written into a temporary directory
    beside ``dst`` and renamed into place when complete.

    Raises:
        ConfigError: ``dst`` exists and is not an empty directory.
    """
    from mapsage_ds.models.normalization import IDENTITY_FIELD

    dst = check_destination(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        config = converted.config
        if converted.pretraining is not None:
            setattr(config, IDENTITY_FIELD, converted.pretraining)
        if not getattr(config, "architectures", None):
            config.architectures = [_architecture(converted)]
        config.save_pretrained(staging)
        state = {k: v.detach().contiguous() for k, v in converted.state_dict.items()}
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "preprocessor_config.json").write_text(
            json.dumps(_processor_config(converted.arch, normalization), indent=2) + "\n")
        if converted.dropped:
            (staging / "mapsage_dropped.json").write_text(json.dumps(converted.dropped, indent=2) + "\n")
        if dst.exists():  # an empty directory
            dst.rmdir()
        os.replace(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_destination(dst: str | Path) -> Path:
    """``dst`` as a Path, if it can take a new directory (absent, or an empty directory).

    Raises:
        ConfigError: ``dst`` exists and is not an empty directory.
    """
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConfigError(f"{dst} already exists and is not empty; choose a new destination or remove it first")
    return dst


def _architecture(converted: ConvertedWeights) -> str:
    if converted.arch == "dinov3":
        return "DINOv3ViTModel"
    if any(k.startswith("decode_head.") for k in converted.state_dict):
        return "SegformerForSemanticSegmentation"
    return "SegformerModel"


def _processor_config(arch: str, normalization: NormalizationDecision) -> dict[str, Any]:
    """An image processor config transformers reads, with the decided statistics and why."""
    from mapsage_ds.models.normalization import DECISION_FIELD

    processor = "SegformerImageProcessor" if arch == "segformer" else "DINOv3ViTImageProcessor"
    return {"image_processor_type": processor, "do_resize": False, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(normalization.mean),
            "image_std": list(normalization.std), DECISION_FIELD: normalization.to_dict()}
