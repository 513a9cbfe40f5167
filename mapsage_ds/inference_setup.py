"""Predictors and refiners from command-line arguments, shared by evaluate.py and predict.py.

A model comes from one of three sources: an export directory written by this project
(``--model``), a DeepSpeed checkpoint of a run plus its ``config.yaml`` (``--checkpoint``,
consolidated with DeepSpeed's ``zero_to_fp32`` utilities, any ZeRO stage), or several exports
with weights (``--ensemble dir:w,dir:w``). Each model keeps its own input normalisation.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mapsage_ds.config import Config, EvalConfig, load_config
from mapsage_ds.data.classes import IGNORE_INDEX, LOVEDA_CLASSES
from mapsage_ds.data.transforms import Normalize
from mapsage_ds.errors import ConfigError, MissingFileError
from mapsage_ds.inference import FLIPS, MODES, Ensemble, InferenceProtocol, Predictor
from mapsage_ds.models import load_exported
from mapsage_ds.tasks import SegmentationTask

__all__ = ["add_model_arguments", "add_protocol_arguments", "add_refine_arguments", "build_predictor",
           "build_refiner", "load_checkpoint_model", "parse_ensemble", "protocol_from_args"]

_DEFAULTS = EvalConfig()


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` | ``--checkpoint`` (+ ``--config``, ``--tag``) | ``--ensemble``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="export directory written by finetune.py (export/ or best/)")
    source.add_argument("--checkpoint", help="DeepSpeed checkpoint directory of a run (runs/x/checkpoints); "
                                             "needs --config")
    source.add_argument("--ensemble", help="exports with weights: DIR:W,DIR:W (probabilities averaged)")
    parser.add_argument("--config", default=None, help="the run's config.yaml (with --checkpoint)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (with --checkpoint; default: latest)")


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """Inference protocol: ``--mode --tile --stride --tta-scales --tta-flip --window-batch-size``."""
    parser.add_argument("--mode", default=_DEFAULTS.mode, choices=MODES)
    parser.add_argument("--tile", type=int, default=_DEFAULTS.tile, help="slide: window side in pixels")
    parser.add_argument("--stride", type=int, default=_DEFAULTS.stride, help="slide: step between windows")
    parser.add_argument("--tta-scales", default=",".join(f"{s:g}" for s in _DEFAULTS.tta_scales),
                        help="comma-separated scale factors, e.g. 0.75,1.0,1.25,1.5")
    parser.add_argument("--tta-flip", nargs="?", const="h", default="",
                        help=f"extra flipped views: bare flag = h; or a comma list of {', '.join(FLIPS)}")
    parser.add_argument("--window-batch-size", type=int, default=_DEFAULTS.window_batch_size,
                        help="slide: windows per forward pass")


def add_refine_arguments(parser: argparse.ArgumentParser) -> None:
    """``--refine sam --sam-model DIR`` and the replacement thresholds."""
    parser.add_argument("--refine", default="none", choices=["none", "sam"], help="boundary refinement (off)")
    parser.add_argument("--sam-model", default=None, help="local SAM directory (e.g. sam-vit-base)")
    parser.add_argument("--sam-score-threshold", type=float, default=0.8, help="minimum SAM predicted IoU")
    parser.add_argument("--sam-confidence", type=float, default=0.9, help="minimum SAM pixel probability")
    parser.add_argument("--sam-min-area", type=int, default=64, help="smallest region prompted (pixels)")
    parser.add_argument("--sam-max-regions", type=int, default=32, help="regions prompted per image")


def _float_list(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated numbers") from error


def protocol_from_args(args: argparse.Namespace) -> InferenceProtocol:
    """The protocol the arguments describe (raises ``ConfigError`` when invalid)."""
    flips = tuple(part.strip() for part in (args.tta_flip or "").split(",") if part.strip())
    return InferenceProtocol(mode=args.mode, tile=args.tile, stride=args.stride,
                             scales=_float_list(args.tta_scales, "--tta-scales"), flips=flips,
                             window_batch_size=args.window_batch_size)


def check_source_arguments(args: argparse.Namespace) -> None:
    """Fail before any process group exists on inconsistent model/refinement arguments."""
    if args.checkpoint is not None and args.config is None:
        raise ConfigError("--checkpoint needs --config: the run's config.yaml (it names the architecture)")
    if args.checkpoint is None and (args.config is not None or args.tag is not None):
        raise ConfigError("--config and --tag only apply with --checkpoint")
    if args.ensemble is not None:
        parse_ensemble(args.ensemble)
    if args.refine == "sam" and args.sam_model is None:
        raise ConfigError("--refine sam needs --sam-model DIR (a local SAM checkpoint)")
    if args.refine != "sam" and args.sam_model is not None:
        raise ConfigError("--sam-model given without --refine sam")


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


def load_checkpoint_model(checkpoint_dir: str | Path, *, config_file: str | Path,
                          tag: str | None = None) -> tuple[nn.Module, Normalize, Config]:
    """The model of a DeepSpeed checkpoint, consolidated to fp32 from any ZeRO stage.

    The network is rebuilt from the run's config (architecture and size, no pretrained
    weights) and every tensor is then loaded from the checkpoint, strictly.

    Raises:
        MissingFileError: If the directory or its ``latest`` tag is missing.
        ConfigError: If the checkpoint's tensors do not fit the network the config describes.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mapsage_ds.models import build_model

    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise MissingFileError(f"--checkpoint {checkpoint_dir}: not a directory")
    if tag is None and not (checkpoint_dir / "latest").is_file():
        raise MissingFileError(f"--checkpoint {checkpoint_dir}: no 'latest' file; pass --tag")
    if tag is not None and not (checkpoint_dir / tag).is_dir():
        raise MissingFileError(f"--checkpoint {checkpoint_dir}: no tag directory {tag}")
    config = load_config(config_file=config_file)
    built = build_model(arch=config.model.arch, size=config.model.size, class_names=list(LOVEDA_CLASSES))
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    # The engine wraps SegmentationTask: the network lives under "model.", training-only parts
    # (an auxiliary boundary head) beside it.
    state = {key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")}
    missing, unexpected = built.module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"--checkpoint {checkpoint_dir} does not fit the {config.model.arch}/{config.model.size} "
                          f"network of {config_file}: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")
    return built.module, built.normalize, config


def _predictor(model: nn.Module, normalize: Normalize, protocol: InferenceProtocol,
               device: torch.device) -> Predictor:
    task = SegmentationTask(model.to(device), ignore_index=IGNORE_INDEX).eval()
    return Predictor(task.predict, normalize=normalize, protocol=protocol, module=task)


def build_predictor(args: argparse.Namespace, *, device: torch.device,
                    protocol: InferenceProtocol) -> tuple[Predictor | Ensemble, dict[str, Any]]:
    """The predictor the model arguments name, and a description of it for reports."""
    if args.model is not None:
        model, normalize = load_exported(args.model)
        return _predictor(model, normalize, protocol, device), {"name": str(args.model), "models": [
            {"source": "export", "path": str(args.model), "weight": 1.0}]}
    if args.checkpoint is not None:
        model, normalize, _ = load_checkpoint_model(args.checkpoint, config_file=args.config, tag=args.tag)
        return _predictor(model, normalize, protocol, device), {"name": str(args.checkpoint), "models": [
            {"source": "deepspeed_checkpoint", "path": str(args.checkpoint), "config": str(args.config),
             "tag": args.tag, "weight": 1.0}]}
    members, described = [], []
    for path, weight in parse_ensemble(args.ensemble):
        model, normalize = load_exported(path)
        members.append((_predictor(model, normalize, protocol, device), weight))
        described.append({"source": "export", "path": path, "weight": weight})
    return Ensemble(members), {"name": f"ensemble({args.ensemble})", "models": described,
                               "ensemble": "weighted mean of softmax probabilities"}


def build_refiner(args: argparse.Namespace, *, device: torch.device):
    """The SAM refiner when ``--refine sam``, else None; plus its description for reports."""
    if args.refine != "sam":
        return None, None
    from mapsage_ds.refine import SamRefiner

    settings = dict(score_threshold=args.sam_score_threshold, confidence=args.sam_confidence,
                    min_region_area=args.sam_min_area, max_regions=args.sam_max_regions)
    refiner = SamRefiner.from_pretrained(args.sam_model, device=device, **settings)
    return refiner, {"method": "sam", "model": str(args.sam_model), **settings}
