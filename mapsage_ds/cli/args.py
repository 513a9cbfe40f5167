"""Command-line arguments shared by the scripts: recipe, config file, overrides."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mapsage_ds.config import Config, load_config, recipe_names
from mapsage_ds.data.classes import LOVEDA_CLASSES
from mapsage_ds.errors import ConfigError, MissingFileError, raised_on_every_rank
from mapsage_ds.evaluation.protocol import FLIPS, MODES, EvalProtocol
from mapsage_ds.evaluation.sources import build_predictor, build_refiner, parse_ensemble
from mapsage_ds.runtime.accelerator import ACCELERATORS


def add_config_arguments(parser: argparse.ArgumentParser, *, default_recipe: str | None) -> None:
    """``--recipe``, ``--config``, ``--set`` and the common shortcuts."""
    parser.add_argument("--recipe", default=None,
                        help=f"packaged recipe ({', '.join(recipe_names())}); default: {default_recipe}, "
                             "unless --config is given (a config file alone starts from the plain defaults)")
    parser.add_argument("--config", default=None, help="YAML file with config fields (applied after --recipe)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field, e.g. --set optim.lr=1e-4 (repeatable)")
    parser.add_argument("--data-root", default=None, help="shortcut for --set data.root=PATH")
    parser.add_argument("--generate-data", action="store_true",
                        help="recipes with generated data (data.synthetic): generate it at --data-root too, not only "
                             "at the recipe's own data.root (shortcut for --set data.generate=true)")
    parser.add_argument("--output-dir", default=None, help="shortcut for --set output_dir=PATH")
    parser.add_argument("--accelerator", default=None,
                        help=f"device type: {' | '.join(ACCELERATORS)} (default: $MAPSAGE_ACCELERATOR, "
                             f"else the first present in that order)")
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


@raised_on_every_rank()
def config_from_args(args: argparse.Namespace, *, default_recipe: str | None,
                     extra_overrides: list[str] = ()) -> Config:
    """Resolve the run config the arguments describe (``extra_overrides`` come before ``--set``).

    Every rank resolves the same arguments before any process group exists, so its errors are
    printed by rank 0 alone (:func:`~mapsage_ds.errors.raised_on_every_rank`).
    """
    recipe = args.recipe or (default_recipe if args.config is None else None)
    overrides = [*extra_overrides, *args.overrides]
    if args.data_root is not None:
        overrides.append(f"data.root={json.dumps(args.data_root)}")
    if args.generate_data:
        overrides.append("data.generate=true")
    if args.output_dir is not None:
        overrides.append(f"output_dir={json.dumps(args.output_dir)}")
    return load_config(recipe=recipe, config_file=args.config, overrides=overrides)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` | ``--checkpoint`` (+ ``--tag``; the run's config.yaml via ``--config``) | ``--ensemble``.

    ``--ensemble`` is a shorthand for ``--set eval.ensemble=[...]``; exactly one source is needed.
    """
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="export directory written by finetune.py (export/ or best/)")
    source.add_argument("--checkpoint", help="DeepSpeed checkpoint directory of a run (runs/x/checkpoints); "
                                             "needs --config RUN/config.yaml")
    source.add_argument("--ensemble", help="exports with weights: DIR:W,DIR:W (probabilities averaged)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (with --checkpoint; default: latest)")


# Shorthand flag -> eval.* key; each given flag becomes one --set override of the eval section.
_PROTOCOL_SHORTHANDS = {"mode": "mode", "tile": "tile", "stride": "stride", "tta_scales": "tta_scales",
                        "tta_flip": "tta_flip", "window_batch_size": "window_batch_size", "batch_size": "batch_size",
                        "max_images": "max_images", "boundary_width": "boundary_width",
                        "boundary_dilation_ratio": "boundary_dilation_ratio"}


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """Shorthands for the ``eval`` section (``--mode slide`` is ``--set eval.mode=slide``)."""
    group = parser.add_argument_group("evaluation protocol (shorthands for --set eval.KEY=VALUE)")
    group.add_argument("--mode", default=None, choices=MODES)
    group.add_argument("--tile", type=int, default=None, help="slide: window side in pixels")
    group.add_argument("--stride", type=int, default=None, help="slide: step between windows")
    group.add_argument("--tta-scales", default=None, help="comma-separated scale factors, e.g. 0.75,1.0,1.25,1.5")
    group.add_argument("--tta-flip", nargs="?", const="h", default=None,
                       help=f"extra flipped views: bare flag = h; or a comma list of {', '.join(FLIPS)}")
    group.add_argument("--window-batch-size", type=int, default=None, help="slide: windows per forward pass")
    group.add_argument("--batch-size", type=int, default=None, help="images per step")
    group.add_argument("--max-images", type=int, default=None, help="evaluate the first N images only")
    group.add_argument("--boundary-width", type=int, default=None,
                       help="boundary IoU band in pixels (default: eval.boundary_dilation_ratio of the diagonal)")
    group.add_argument("--boundary-dilation-ratio", type=float, default=None)


def add_sweep_argument(parser: argparse.ArgumentParser) -> None:
    """``--tta-sweep scales=... flips=...`` (evaluate only; see :func:`~mapsage_ds.evaluation.sweep.parse_sweep`)."""
    parser.add_argument("--tta-sweep", nargs="+", default=None, metavar="KEY=VALUES",
                        help="score every TTA protocol drawn from these scales and flips in one pass and write a "
                             "leaderboard (tta_sweep.json/.md), e.g. --tta-sweep scales=0.75,1,1.25,1.5 flips=h,v,d4: "
                             "every non-empty subset of the scales × every subset of the flips whose options share "
                             f"no view (d4 stands alone); flips among {', '.join(FLIPS)}; replaces --tta-scales and "
                             "--tta-flip (mode, tile, stride still apply)")


@raised_on_every_rank()
def protocol_overrides(args: argparse.Namespace) -> list[str]:
    """The ``eval.*`` overrides the protocol shorthands given on the command line stand for.

    Besides the scalar keys: ``--ensemble DIR:W,...`` is ``eval.ensemble`` and ``--refine sam
    --sam-model PATH --sam-...`` is ``eval.refine``.
    """
    overrides = []
    if getattr(args, "ensemble", None) is not None:
        members = [{"path": path, "weight": weight} for path, weight in parse_ensemble(args.ensemble)]
        overrides.append(f"eval.ensemble={json.dumps(members)}")
    if getattr(args, "refine", None) == "sam":
        refine = {"method": "sam", "model": args.sam_model, "score_threshold": args.sam_score_threshold,
                  "confidence": args.sam_confidence, "min_area": args.sam_min_area,
                  "max_regions": args.sam_max_regions}
        overrides.append(f"eval.refine={json.dumps(refine)}")
    elif getattr(args, "refine", None) == "none":
        overrides.append("eval.refine=null")
    for flag, key in _PROTOCOL_SHORTHANDS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if flag == "tta_scales":
            value = list(_float_list(value, "--tta-scales"))
        elif flag == "tta_flip":
            value = [part.strip() for part in value.split(",") if part.strip()]
        overrides.append(f"eval.{key}={json.dumps(value)}")
    return overrides


def add_refine_arguments(parser: argparse.ArgumentParser) -> None:
    """``--refine sam --sam-model DIR`` and the replacement thresholds."""
    parser.add_argument("--refine", default=None, choices=["none", "sam"],
                        help="boundary refinement, shorthand for eval.refine (default: the config's, off)")
    parser.add_argument("--sam-model", default=None,
                        help="local SAM: a transformers directory (e.g. sam-vit-base) or Meta's sam_vit_{b,l,h}_*.pth")
    parser.add_argument("--sam-score-threshold", type=float, default=0.8, help="minimum SAM predicted IoU")
    parser.add_argument("--sam-confidence", type=float, default=0.9, help="minimum SAM pixel probability")
    parser.add_argument("--sam-min-area", type=int, default=64, help="smallest region prompted (pixels)")
    parser.add_argument("--sam-max-regions", type=int, default=32, help="regions prompted per image")


def _float_list(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated numbers") from error


@raised_on_every_rank()
def check_source_arguments(args: argparse.Namespace, protocol: EvalProtocol) -> None:
    """Fail before any process group exists on inconsistent model/refinement arguments or a missing model."""
    sources = [name for name, given in (("--model", args.model), ("--checkpoint", args.checkpoint),
                                        ("--ensemble / eval.ensemble", protocol.ensemble)) if given]
    if len(sources) != 1:
        raise ConfigError(f"expected exactly one model source, got {', '.join(sources) or 'none'}: pass --model DIR, "
                          "--checkpoint DIR (with --config RUN/config.yaml) or --ensemble DIR:W,DIR:W")
    if args.checkpoint is not None and args.config is None:
        raise ConfigError("--checkpoint needs --config: the run's config.yaml (it names the architecture)")
    if args.checkpoint is None and args.tag is not None:
        raise ConfigError("--tag only applies with --checkpoint")
    if args.sam_model is not None and args.refine != "sam":
        raise ConfigError("--sam-model given without --refine sam")
    for flag, path in (("--model", args.model), ("--checkpoint", args.checkpoint)):
        if path is not None and not Path(path).is_dir():
            raise MissingFileError(f"{flag} {path}: no such directory")


def build_predictor_from_args(args: argparse.Namespace, config: Config, *, device, protocol: EvalProtocol):
    """:func:`~mapsage_ds.evaluation.sources.build_predictor` for the ``--model/--checkpoint/--ensemble`` arguments.

    A checkpoint's network is rebuilt from the run's config (``--config RUN/config.yaml``), with its
    starting weights, so that its architecture (``model.size: auto``) and normalisation are the run's.
    """
    network = None
    if args.checkpoint is not None:
        from mapsage_ds.builders import build_run_model

        network = build_run_model(config, list(LOVEDA_CLASSES))
    return build_predictor(model=args.model, checkpoint=args.checkpoint, checkpoint_network=network, tag=args.tag,
                           ensemble=protocol.ensemble, device=device, protocol=protocol)


def build_refiner_from_args(protocol: EvalProtocol, *, device):
    """The SAM refiner of ``eval.refine``, or ``(None, None)`` when refinement is off."""
    if protocol.refine is None:
        return None, None
    return build_refiner(protocol.refine, device=device)
