"""Where evaluated models come from: exports, DeepSpeed checkpoints, ensembles; and the SAM refiner.

A model comes from one of three sources: an export directory written by this project
(``--model``), a DeepSpeed checkpoint of a run plus its ``config.yaml`` (``--checkpoint``,
consolidated with DeepSpeed's ``zero_to_fp32`` utilities, any ZeRO stage), or several exports
with weights (``--ensemble dir:w,dir:w``). Each model keeps its own input normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mapsage_ds.data.classes import IGNORE_INDEX
from mapsage_ds.data.transforms import Normalize
from mapsage_ds.errors import ConfigError, MissingFileError
from mapsage_ds.evaluation.predictor import Ensemble, Predictor
from mapsage_ds.evaluation.protocol import EnsembleMember, EvalProtocol, RefineSettings
from mapsage_ds.models import load_exported
from mapsage_ds.models.factory import BuiltModel
from mapsage_ds.runtime.checkpoint import latest_tag, read_fp32_state, verify_checkpoint
from mapsage_ds.tasks import SegmentationTask
from mapsage_ds.training.run_dir import read_run_id

__all__ = ["build_predictor", "build_refiner", "load_checkpoint_model", "parse_ensemble"]


def parse_ensemble(spec: str) -> list[tuple[str, float]]:
    """``"a:0.6,b:0.4"`` -> ``[("a", 0.6), ("b", 0.4)]``; a member without ``:w`` weighs 1.

    Raises:
        ConfigError: On an empty spec, a non-numeric or non-positive weight.
    """
    members = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        path, sep, weight = part.rpartition(":")
        if not sep:
            path, weight = part, "1"
        try:
            value = float(weight)
        except ValueError as error:
            raise ConfigError(f"--ensemble member {part!r}: weight {weight!r} is not a number") from error
        if not value > 0:
            raise ConfigError(f"--ensemble member {part!r}: weight must be > 0")
        members.append((path, value))
    if not members:
        raise ConfigError(f"--ensemble {spec!r}: expected DIR:W[,DIR:W...]")
    return members


def load_checkpoint_model(checkpoint_dir: str | Path, *, built: BuiltModel, tag: str | None = None) -> nn.Module:
    """The network ``built`` with the weights of a DeepSpeed checkpoint, consolidated to fp32 from any ZeRO stage.

    ``built`` is the run's network rebuilt from its config (the builders do this); every tensor
    is then loaded from the checkpoint, strictly.

    Raises:
        MissingFileError: If the directory or its ``latest`` tag is missing.
        CheckpointError: If the checkpoint fails :func:`~mapsage_ds.runtime.checkpoint.verify_checkpoint`.
        ConfigError: If the checkpoint's tensors do not fit the network.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise MissingFileError(f"--checkpoint {checkpoint_dir}: not a directory")
    if tag is None and not (checkpoint_dir / "latest").is_file():
        raise MissingFileError(f"--checkpoint {checkpoint_dir}: no 'latest' file; pass --tag")
    if tag is not None and not (checkpoint_dir / tag).is_dir():
        raise MissingFileError(f"--checkpoint {checkpoint_dir}: no tag directory {tag}")
    # DeepSpeed's reader unpickles: only a checkpoint its own run wrote, unchanged since, gets there.
    tag = tag or latest_tag(checkpoint_dir)
    verify_checkpoint(checkpoint_dir / tag, run_id=read_run_id(checkpoint_dir.parent))
    state = read_fp32_state(checkpoint_dir / tag)
    # The engine wraps SegmentationTask: the network lives under "model.", training-only parts
    # (an auxiliary boundary head) beside it.
    state = {key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")}
    missing, unexpected = built.module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"--checkpoint {checkpoint_dir} does not fit the network of the run's config: "
                          f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return built.module


def _predictor(model: nn.Module, normalize: Normalize, protocol: EvalProtocol,
               device: torch.device) -> Predictor:
    task = SegmentationTask(model.to(device), ignore_index=IGNORE_INDEX).eval()
    return Predictor(task.predict, normalize=normalize, protocol=protocol, module=task)


def build_predictor(*, model: str | None = None, checkpoint: str | None = None,
                    checkpoint_network: BuiltModel | None = None, tag: str | None = None,
                    ensemble: Sequence[EnsembleMember] = (), device: torch.device,
                    protocol: EvalProtocol) -> tuple[Predictor | Ensemble, dict[str, Any]]:
    """The predictor of one model source, and a description of it for reports.

    The source is an export (``model``), a DeepSpeed checkpoint (``checkpoint``, an optional ``tag``,
    and ``checkpoint_network``: the run's network rebuilt from its config) or an ``ensemble``
    (``"DIR:W,DIR:W"``).
    """
    if model is not None:
        network, normalize = load_exported(model)
        return _predictor(network, normalize, protocol, device), {"name": str(model), "models": [
            {"source": "export", "path": str(model), "weight": 1.0}]}
    if checkpoint is not None:
        network = load_checkpoint_model(checkpoint, built=checkpoint_network, tag=tag)
        return _predictor(network, checkpoint_network.normalize, protocol, device), {
            "name": str(checkpoint), "models": [{"source": "deepspeed_checkpoint", "path": str(checkpoint),
                                                 "tag": tag, "weight": 1.0}]}
    members, described = [], []
    if not ensemble:
        raise ConfigError("no model: pass --model DIR, --checkpoint DIR (with --config) or --ensemble DIR:W,...")
    for member in ensemble:
        network, normalize = load_exported(member.path)
        members.append((_predictor(network, normalize, protocol, device), member.weight))
        described.append({"source": "export", "path": member.path, "weight": member.weight})
    spec = ",".join(f"{m.path}:{m.weight:g}" for m in ensemble)
    return Ensemble(members), {"name": f"ensemble({spec})", "models": described,
                               "ensemble": "weighted mean of softmax probabilities"}


def build_refiner(settings: RefineSettings, *, device: torch.device):
    """The SAM refiner ``settings`` (``eval.refine``) describe, and its description for reports."""
    from mapsage_ds.evaluation.refine import SamRefiner

    thresholds = dict(score_threshold=settings.score_threshold, confidence=settings.confidence,
                      min_region_area=settings.min_area, max_regions=settings.max_regions)
    refiner = SamRefiner.from_pretrained(settings.model, device=device, **thresholds)
    return refiner, {"method": settings.method, "model": str(settings.model), **thresholds}
