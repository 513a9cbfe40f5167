"""Export trained weights as a Hugging Face directory that plain ``transformers`` loads.

The directory holds ``config.json`` (with ``id2label``), ``model.safetensors`` in the model's own
key layout, ``preprocessor_config.json`` with the normalisation used in training (and, under
``mapsage_normalization``, why it was chosen), and the resolved run config. Parameters are the
optimizer's fp32 master weights, gathered from any ZeRO stage; the directory is written beside
the target and moved into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import deepspeed
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel, SegformerImageProcessor

from mapsage_ds.errors import MapSageError, StorageError
from mapsage_ds.files import human_bytes
from mapsage_ds.models.dinov3 import HEAD_CONFIG, HEAD_WEIGHTS, DINOv3Segmenter
from mapsage_ds.models.normalization import DECISION_FIELD
from mapsage_ds.runtime.engine_state import full_fp32_param
from mapsage_ds.runtime.failures import raise_if_any_failed


def gather_full_state_dict(model: nn.Module, *, stage: int, keep: bool = True) -> dict[str, torch.Tensor]:
    """Full fp32 copy of ``model``'s state on the CPU; a collective: call on every rank.

    Trainable parameters come from the optimizer's fp32 master copy; frozen ones and buffers
    from the module (gathered first under ZeRO-3, where every rank holds a shard). Tensors are
    gathered one at a time and only ranks with ``keep`` collect them: the others take part in
    each gather and drop the tensor at once, so they never hold more than one full tensor
    (a 7B export costs its full size on one rank, not on all of them). Returns ``{}`` there.
    """
    params = dict(model.named_parameters())
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        param = params.get(name)
        if param is None:  # a buffer, replicated on every rank
            value = tensor.detach()
        elif param.requires_grad:
            value = full_fp32_param(param)  # any ZeRO stage, 0 included
            if value is None:
                raise MapSageError(f"no fp32 master copy of trainable parameter '{name}' (is it in the optimizer?)")
        elif stage == 3:
            with deepspeed.zero.GatheredParameters([param]):
                value = param.detach().clone()
        else:
            value = param.detach()
        if keep:
            state[name] = value.float().cpu().clone() if value.is_floating_point() else value.cpu().clone()
        del value
    return state


def write_hf_export(
    model: PreTrainedModel | DINOv3Segmenter,
    state_dict: dict[str, torch.Tensor],
    out_dir: str | Path,
    *,
    image_mean: tuple[float, ...],
    image_std: tuple[float, ...],
    run_config: dict[str, Any] | None = None,
) -> Path:
    """Write a loadable HF directory at ``out_dir``, replacing an older one only when complete."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _write_staging(model, state_dict, staging, image_mean=image_mean, image_std=image_std, run_config=run_config)
    except (OSError, RuntimeError, SafetensorError) as error:  # neither library raises OSError on a full disk
        shutil.rmtree(staging, ignore_errors=True)
        needed = sum(t.numel() * t.element_size() for t in state_dict.values())
        free = shutil.disk_usage(out_dir.parent).free
        raise StorageError(f"writing the export {out_dir} failed: {error}. {human_bytes(free)} free on that file "
                           f"system; the export needs about {human_bytes(needed)}. Nothing was replaced"
                           f"{f' ({out_dir} is the previous export)' if out_dir.exists() else ''}") from error
    if out_dir.exists():
        retired = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(out_dir, retired)
        os.replace(staging, out_dir)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, out_dir)
    return out_dir


def _write_staging(model: PreTrainedModel | DINOv3Segmenter, state_dict: dict[str, torch.Tensor], staging: Path, *,
                   image_mean: tuple[float, ...], image_std: tuple[float, ...],
                   run_config: dict[str, Any] | None) -> None:
    # save_pretrained writes the hub key layout, which can differ from the in-memory names
    # (transformers 5 renamed SegFormer's modules but keeps checkpoints loadable by 4.x).
    if isinstance(model, DINOv3Segmenter):
        _write_dinov3(model, state_dict, staging)
    else:
        model.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
    _declare_float32(staging / "config.json")
    SegformerImageProcessor(
        do_resize=False, do_rescale=True, do_normalize=True, image_mean=list(image_mean),
        image_std=list(image_std), do_reduce_labels=False,
    ).save_pretrained(staging)
    _record_normalization(staging / "preprocessor_config.json", model, image_mean, image_std)
    if run_config is not None:
        (staging / "mapsage_config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))


def _write_dinov3(model: DINOv3Segmenter, state_dict: dict[str, torch.Tensor], staging: Path) -> None:
    """Backbone as a plain ``DINOv3ViTModel`` directory; the head beside it in ``head.safetensors``."""
    backbone = {k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")}
    head = {k.removeprefix("head."): v.contiguous() for k, v in state_dict.items() if k.startswith("head.")}
    model.backbone.save_pretrained(staging, state_dict=backbone, safe_serialization=True)
    save_file(head, str(staging / HEAD_WEIGHTS), metadata={"format": "pt"})
    (staging / HEAD_CONFIG).write_text(json.dumps(model.head_config(), indent=2) + "\n")


def _record_normalization(processor_file: Path, model: nn.Module, mean: tuple[float, ...],
                          std: tuple[float, ...]) -> None:
    """Say in ``preprocessor_config.json`` why these statistics (the decision :func:`build_model` recorded)."""
    config = getattr(model.backbone if isinstance(model, DINOv3Segmenter) else model, "config", None)
    decision = getattr(config, DECISION_FIELD, None)
    if not isinstance(decision, dict):
        decision = {"mean": list(mean), "std": list(std), "pretraining": None,
                    "reason": "given to the export (no decision recorded in the model's config)"}
    elif not (_close(decision.get("mean"), mean) and _close(decision.get("std"), std)):
        decision = {**decision, "mean": list(mean), "std": list(std),
                    "reason": f"given to the export, differing from the decision ({decision.get('reason')})"}
    processor = json.loads(processor_file.read_text())
    processor[DECISION_FIELD] = decision
    processor_file.write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n")


def _close(recorded: Any, used: tuple[float, ...]) -> bool:
    return (isinstance(recorded, list) and len(recorded) == len(used)
            and all(abs(a - b) < 1e-6 for a, b in zip(recorded, used, strict=True)))


def _declare_float32(config_file: Path) -> None:
    """Record fp32 as the weights' dtype: save_pretrained writes the live (possibly bf16) one."""
    config = json.loads(config_file.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = "float32"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_model(
    model: PreTrainedModel, out_dir: str | Path, *, stage: int, is_main: bool, **metadata: Any
) -> Path | None:
    """Gather on every rank, write on rank 0, then wait for it; returns the path on rank 0."""
    state_dict = gather_full_state_dict(model, stage=stage, keep=is_main)
    path, error = None, None
    if is_main:
        try:
            path = write_hf_export(model, state_dict, out_dir, **metadata)
        except StorageError as failure:
            error = failure
    raise_if_any_failed(error)  # also the barrier that makes the export visible to every rank
    return path
