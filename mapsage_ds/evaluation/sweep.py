"""TTA sweep: score many test-time-augmentation protocols in one evaluation pass and rank them.

A sweep is given scales and flip options (``mapsage-evaluate --tta-sweep scales=0.75,1,1.25
flips=h,v,d4``). It scores every protocol made of

    * a non-empty subset of the scales (in the order given), crossed with
    * a subset of the flip options, the empty one included, whose options share no view
      (``d4`` holds ``h``, ``v`` and ``hv``, so it is never combined with them);

the identity view of each scale is always part of a protocol. ``S`` scales and the flips
``h,v,d4`` give ``(2**S - 1) * 5`` protocols (flip subsets: none, h, v, h+v, d4).

Each distinct view (scale, dihedral view) is predicted once per image and mapped back to the
image (:meth:`Predictor.view_logits`); every protocol then averages its own views' logits in the
order its :class:`Predictor` would (:func:`average_views`), so a protocol's predictions, and its
confusion matrix, are bit for bit those of a separate evaluation with that protocol. The pass is
:func:`~mapsage_ds.evaluation.loop.run_evaluation` itself (sharded, ranks in step, metrics
all-reduced) with one set of meters per protocol.

Cost is counted in network evaluations per image: views × windows per view (1 per view in whole
mode), summed over the members of an ensemble and averaged over the evaluated images; it does not
depend on how windows are batched.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset

from mapsage_ds.errors import ConfigError
from mapsage_ds.evaluation.loop import run_evaluation
from mapsage_ds.evaluation.metrics import SegmentationMetrics
from mapsage_ds.evaluation.predictor import Ensemble, Predictor, ViewKey, average_views
from mapsage_ds.evaluation.protocol import FLIPS, EvalProtocol, overlapping_flips
from mapsage_ds.evaluation.report import leaderboard_table, report_dict
from mapsage_ds.files import write_json, write_text_atomic

__all__ = ["MAX_PROTOCOLS", "SWEEP_FILES", "SweepEntry", "SweepResult", "SweepSpec", "TTASweep", "parse_sweep",
           "run_sweep", "sweep_protocols", "tta_name", "write_sweep_report"]

# More protocols than this is a mistyped sweep rather than a plan (each one has its own meters).
MAX_PROTOCOLS = 512
SWEEP_FILES = ("tta_sweep.json", "tta_sweep.md")


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep draws its protocols from.

    Attributes:
        scales: Candidate TTA scales (distinct, > 0), in order.
        flips: Candidate flip options (:data:`~mapsage_ds.evaluation.protocol.FLIPS`), distinct.
    """

    scales: tuple[float, ...] = (1.0,)
    flips: tuple[str, ...] = ()


def parse_sweep(spec: str | Sequence[str]) -> SweepSpec:
    """``"scales=0.75,1,1.25 flips=h,v,d4"`` (one string or its words) -> :class:`SweepSpec`.

    Either key may be left out (scales: ``1``; flips: none); ``flips=`` is no flip option.

    Raises:
        ConfigError: On an unknown or repeated key, a scale that is not a number > 0, an unknown flip
            option, repeated values, or a sweep of more than :data:`MAX_PROTOCOLS` protocols.
    """
    words = spec.split() if isinstance(spec, str) else [w for part in spec for w in part.split()]
    values: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or key not in ("scales", "flips"):
            raise ConfigError(f"--tta-sweep {word!r}: expected scales=S,S,... and/or flips=F,F,... "
                              f"(flips among {', '.join(FLIPS)})")
        if key in values:
            raise ConfigError(f"--tta-sweep: {key}= given twice")
        values[key] = value
    if not values:
        raise ConfigError("--tta-sweep: expected scales=S,S,... and/or flips=F,F,...")
    parts = [p.strip() for p in values.get("scales", "1").split(",") if p.strip()]
    try:
        scales = tuple(float(p) for p in parts)
    except ValueError as error:
        raise ConfigError(f"--tta-sweep scales={values['scales']}: expected comma-separated numbers > 0") from error
    flips = tuple(p.strip() for p in values.get("flips", "").split(",") if p.strip())
    problems = []
    if not scales or any(not s > 0 for s in scales) or len(set(scales)) != len(scales):
        problems.append(f"scales={values.get('scales')}: expected distinct numbers > 0")
    if any(f not in FLIPS for f in flips) or len(set(flips)) != len(flips):
        problems.append(f"flips={values.get('flips')}: expected distinct values among {', '.join(FLIPS)}")
    if problems:
        raise ConfigError("--tta-sweep " + "; ".join(problems))
    result = SweepSpec(scales, flips)
    count = (2 ** len(scales) - 1) * len(_flip_subsets(flips))
    if count > MAX_PROTOCOLS:
        raise ConfigError(f"--tta-sweep {' '.join(words)}: {count} protocols, more than {MAX_PROTOCOLS}; "
                          "give fewer scales")
    return result


def _flip_subsets(flips: Sequence[str]) -> list[tuple[str, ...]]:
    subsets = (combo for size in range(len(flips) + 1) for combo in itertools.combinations(flips, size))
    return [combo for combo in subsets if not overlapping_flips(combo)]


def sweep_protocols(base: EvalProtocol, spec: SweepSpec) -> list[EvalProtocol]:
    """The swept protocols: ``base`` with each scale subset × each valid flip subset (module docstring).

    Everything but ``tta_scales`` and ``tta_flip`` (mode, tile, stride, batch sizes, boundary band,
    ``max_images``) is ``base``'s. Order: scale subsets by size, then flip subsets by size.
    """
    scale_subsets = [combo for size in range(1, len(spec.scales) + 1)
                     for combo in itertools.combinations(spec.scales, size)]
    return [dataclasses.replace(base, tta_scales=list(scales), tta_flip=list(flips))
            for scales in scale_subsets for flips in _flip_subsets(spec.flips)]


def tta_name(protocol: EvalProtocol) -> str:
    """Short name of a protocol's TTA, e.g. ``scales 0.75,1; flips h,v``."""
    return (f"scales {','.join(f'{s:g}' for s in protocol.tta_scales)}; "
            f"flips {','.join(protocol.tta_flip) or 'none'}")


def _geometry(protocol: EvalProtocol) -> tuple:
    return (protocol.mode, protocol.tile, protocol.stride) if protocol.mode == "slide" else (protocol.mode,)


class TTASweep:
    """A predictor that answers one prediction per protocol, each view computed once (a ``MultiPredictor``).

    Args:
        predictor: The model (a :class:`Predictor`) or an :class:`Ensemble`, whose members each run
            every view; its own protocol gives the geometry (whole/slide, tile, stride, window batch).
        protocols: The protocols scored; only their TTA settings are used.

    Raises:
        ConfigError: If there is no protocol, or a protocol's mode, tile or stride differ from a
            member predictor's (the views run with the predictor's geometry).
    """

    def __init__(self, predictor: Predictor | Ensemble, protocols: Sequence[EvalProtocol]) -> None:
        if not protocols:
            raise ConfigError("a TTA sweep needs at least one protocol")
        self.predictor = predictor
        self.members = [p for p, _ in predictor.members] if isinstance(predictor, Ensemble) else [predictor]
        for member in self.members:
            mismatched = [p for p in protocols if _geometry(p) != _geometry(member.protocol)]
            if mismatched:
                raise ConfigError(f"swept protocol {_geometry(mismatched[0])} differs from the predictor's "
                                  f"{_geometry(member.protocol)}: a sweep varies the TTA only")
        self.protocols = list(protocols)
        keys = dict.fromkeys(key for protocol in self.protocols for key in protocol.views)
        scale_order = {scale: i for i, scale in enumerate(dict.fromkeys(scale for scale, _ in keys))}
        # Grouped by scale, so each scale's resize is computed once per image.
        self.views: list[ViewKey] = sorted(keys, key=lambda key: scale_order[key[0]])
        self.images = 0
        self.windows = [0] * len(self.protocols)  # network evaluations per protocol, this rank's images
        self.union_windows = 0  # what the sweep itself ran

    @property
    def num_outputs(self) -> int:
        """One output per protocol."""
        return len(self.protocols)

    @torch.no_grad()
    def predict_each(self, images: Tensor) -> list[Tensor]:
        """Class-index maps ``[N, H, W]``, one per protocol, bitwise those of the protocol's own predictor."""
        caches = [member.view_logits(images, self.views) for member in self.members]
        batch, height, width = images.shape[0], *images.shape[-2:]
        self.images += batch
        self.union_windows += batch * sum(m.view_windows(height, width, self.views) for m in self.members)
        predictions = []
        for index, protocol in enumerate(self.protocols):
            self.windows[index] += batch * sum(m.view_windows(height, width, protocol.views) for m in self.members)
            logits = [average_views(cache[key] for key in protocol.views) for cache in caches]
            if isinstance(self.predictor, Ensemble):
                predictions.append(self.predictor.mix(x.softmax(dim=1) for x in logits).argmax(dim=1))
            else:
                predictions.append(logits[0].argmax(dim=1))
        return predictions

    def forward_counts(self, batch: int, height: int, width: int) -> list[int]:
        """Forwards per member for every view of the sweep (each once)."""
        return [member.view_forwards(batch, height, width, self.views) for member in self.members]

    def pad_forwards(self, counts: Sequence[int], device: torch.device) -> None:
        """Padding forwards per member (see :meth:`Predictor.pad_forwards`)."""
        self.predictor.pad_forwards(counts, device)

    @property
    def forwards_run(self) -> int:
        """Model forwards so far, padding included."""
        return self.predictor.forwards_run

    def modules(self) -> list[nn.Module]:
        """The predictor's modules."""
        return self.predictor.modules()


@dataclass
class SweepEntry:
    """One swept protocol and its scores.

    Attributes:
        protocol: The protocol.
        metrics: Its scores, equal to a separate evaluation with it.
        windows_per_image: Its cost: network evaluations per image (views × windows, all members),
            averaged over the evaluated images.
    """

    protocol: EvalProtocol
    metrics: SegmentationMetrics
    windows_per_image: float

    @property
    def name(self) -> str:
        """The TTA in short (:func:`tta_name`)."""
        return tta_name(self.protocol)


@dataclass
class SweepResult:
    """What a sweep produced.

    Attributes:
        entries: Every protocol, best mIoU first (ties: cheaper first, then sweep order).
        windows_per_image: Network evaluations per image the sweep itself ran (each view once).
        forwards: Model forwards this rank ran, padding included (equal on every rank).
    """

    entries: list[SweepEntry]
    windows_per_image: float
    forwards: int


def _sum_over_ranks(values: list[int], device: torch.device, world_size: int) -> list[int]:
    if world_size == 1 or not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def run_sweep(
    predictor: Predictor | Ensemble,
    dataset: Dataset,
    *,
    protocols: Sequence[EvalProtocol],
    device: torch.device,
    rank: int,
    world_size: int,
    class_names: list[str],
    ignore_index: int = 255,
) -> SweepResult:
    """Scores every protocol on ``dataset`` in one sharded pass; a collective: call on every rank.

    Args:
        predictor: The model or ensemble (its protocol gives the geometry).
        dataset: Items ``{"image", "mask", "name"}`` as for :func:`run_evaluation`.
        protocols: The protocols (e.g. :func:`sweep_protocols`); the first gives ``batch_size``,
            ``max_images`` and the boundary band, which sweeps share.
        device: This rank's device.
        rank: This rank.
        world_size: Number of ranks.
        class_names: One name per class.
        ignore_index: Mask value never scored.

    Returns:
        The ranked protocols with their scores and costs (identical on every rank).
    """
    sweep = TTASweep(predictor, protocols)
    result = run_evaluation(sweep, dataset, device=device, rank=rank, world_size=world_size, class_names=class_names,
                            protocol=protocols[0], ignore_index=ignore_index)
    images, union, *windows = _sum_over_ranks([sweep.images, sweep.union_windows, *sweep.windows], device,
                                              world_size)
    per_image = (lambda count: count / images) if images else (lambda count: 0.0)
    order = sorted(range(len(protocols)), key=lambda i: (_rank_key(result.outputs[i].miou), windows[i], i))
    entries = [SweepEntry(protocols[i], result.outputs[i], per_image(windows[i])) for i in order]
    return SweepResult(entries, per_image(union), result.forwards)


def _rank_key(miou: float) -> float:
    return -miou if miou is not None and math.isfinite(miou) else math.inf


def sweep_report(result: SweepResult, *, info: dict[str, Any]) -> dict[str, Any]:
    """The content of ``tta_sweep.json``: ``info``, the sweep's own cost, and the ranked protocols."""
    rows = [{"rank": rank, **_row(entry, info)} for rank, entry in enumerate(result.entries, start=1)]
    return {**info, "protocols": len(rows), "sweep_windows_per_image": result.windows_per_image,
            "separate_windows_per_image": sum(e.windows_per_image for e in result.entries), "leaderboard": rows}


def _row(entry: SweepEntry, info: dict[str, Any]) -> dict[str, Any]:
    return {**report_dict(entry.metrics, info={"name": entry.name, "split": info.get("split", ""),
                                               "protocol": entry.protocol.to_dict()}),
            "num_views": entry.protocol.num_views, "windows_per_image": entry.windows_per_image}


def write_sweep_report(out_dir: str | Path, result: SweepResult, *, info: dict[str, Any],
                       output: str | Path | None = None) -> str:
    """Write ``tta_sweep.json`` and ``tta_sweep.md`` into ``out_dir`` (the JSON also to ``output``); returns the table.

    Args:
        out_dir: The report directory (created if needed).
        result: The sweep's result.
        info: What was evaluated (name, models, split ...), stored at the top of the JSON.
        output: Another path for the JSON, if given.
    """
    out_dir = Path(out_dir)
    data = sweep_report(result, info=info)
    write_json(out_dir / SWEEP_FILES[0], data)
    if output is not None:
        write_json(output, data)
    separate = data["separate_windows_per_image"]
    markdown = (f"# TTA sweep: {info.get('name', out_dir.name)}\n\n"
                f"{len(result.entries)} protocols, best mIoU first (ties: cheaper first). Cost is network "
                f"evaluations per image (views × windows per view). The sweep ran {result.windows_per_image:.4g} "
                f"per image (each view once); separate evaluations would run {separate:.4g}.\n\n"
                + leaderboard_table(data["leaderboard"], extra_columns=[("views", "num_views"),
                                                                         ("windows/image", "windows_per_image")]))
    write_text_atomic(out_dir / SWEEP_FILES[1], markdown)
    return markdown
