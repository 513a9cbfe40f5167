"""Sharded evaluation: one predictor, one protocol, every rank in step.

The same :func:`run_evaluation` serves validation during training and ``scripts/evaluate.py``,
so their numbers are the same numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset

from mapsage_ds.data.loaders import eval_batches_per_rank, eval_shard
from mapsage_ds.errors import ConfigError, DataError
from mapsage_ds.evaluation.metrics import BoundaryIoU, ConfusionMatrix, SegmentationMetrics
from mapsage_ds.evaluation.predictor import Ensemble, Predictor, eval_mode
from mapsage_ds.evaluation.protocol import EvalProtocol
from mapsage_ds.tasks.segmentation import SegmentationTask


class Refiner(Protocol):
    """What evaluation needs of a refinement step (e.g. :class:`mapsage_ds.refine.SamRefiner`)."""

    def refine(self, images: Tensor, probabilities: Tensor, *, valid: Tensor | None = None) -> Tensor:
        """Refined labels ``[N, H, W]`` from ``uint8`` images and class probabilities."""


@runtime_checkable
class MultiPredictor(Protocol):
    """A predictor that scores several protocols in one pass (e.g. :class:`mapsage_ds.evaluation.sweep.TTASweep`).

    Besides what :class:`Predictor` offers to the loop (``forward_counts``, ``pad_forwards``,
    ``forwards_run``, ``modules``), it answers one prediction per protocol.
    """

    num_outputs: int

    def predict_each(self, images: Tensor) -> list[Tensor]:
        """One ``[N, H, W]`` class-index map per protocol, in order."""


@dataclass
class Panel:
    """One evaluated image kept for the report (CPU tensors)."""

    name: str
    image: Tensor  # uint8 [3, H, W]
    mask: Tensor  # int64 [H, W]
    prediction: Tensor  # int64 [H, W]


@dataclass
class EvaluationResult:
    """What one evaluation pass produced.

    Attributes:
        metrics: Scores of the final predictions (refined ones when a refiner ran).
        before_refinement: Scores of the coarse predictions when a refiner ran, else None.
        panels: The first few images of the dataset with their predictions (the same on every rank).
        forwards: Model forwards this rank ran, padding included (equal on every rank).
        outputs: Scores of each output of a :class:`MultiPredictor`, in order (``metrics`` is the
            first); ``[metrics]`` for a plain predictor.
    """

    metrics: SegmentationMetrics
    before_refinement: SegmentationMetrics | None = None
    panels: list[Panel] = field(default_factory=list)
    forwards: int = 0
    outputs: list[SegmentationMetrics] = field(default_factory=list)


class _Meters:
    """Confusion matrix plus boundary IoU counts."""

    def __init__(self, *, class_names, ignore_index, device, boundary_width, boundary_dilation_ratio) -> None:
        self.confusion = ConfusionMatrix(len(class_names), ignore_index=ignore_index, device=device,
                                         class_names=class_names)
        self.boundary = BoundaryIoU(len(class_names), ignore_index=ignore_index, device=device,
                                    width=boundary_width, dilation_ratio=boundary_dilation_ratio)

    def update(self, pred: Tensor, target: Tensor) -> None:
        self.confusion.update(pred, target)
        self.boundary.update(pred, target)

    def finish(self) -> SegmentationMetrics:
        self.confusion.all_reduce()
        self.boundary.all_reduce()
        per_class, mean = self.boundary.compute()
        return dataclasses.replace(self.confusion.compute(), boundary_iou=per_class, mean_boundary_iou=mean)


def as_predictor(model: Predictor | Ensemble | SegmentationTask) -> Predictor | Ensemble:
    """A predictor as given; a bare task means whole-image inference on standardised images."""
    if isinstance(model, SegmentationTask):
        return Predictor(model.predict, normalize=None, module=model)
    return model


def _max_over_ranks(counts: list[int], device: torch.device, world_size: int) -> list[int]:
    if world_size == 1 or not dist.is_initialized():
        return counts
    tensor = torch.tensor(counts, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


@torch.no_grad()
def run_evaluation(
    predictor: Predictor | Ensemble | SegmentationTask | MultiPredictor,
    dataset: Dataset,
    *,
    device: torch.device,
    rank: int,
    world_size: int,
    class_names: list[str],
    protocol: EvalProtocol | None = None,
    ignore_index: int = 255,
    refiner: Refiner | None = None,
    num_panels: int = 0,
) -> EvaluationResult:
    """Scores ``predictor`` on ``dataset`` sharded over ranks; a collective: call on every rank.

    Each image is scored exactly once across ranks. Before each step the ranks agree (an
    all-reduce of the maximum) on how many model forwards the step takes, and a rank that
    needs fewer (a shorter shard, smaller images) runs discarded padding forwards, so every
    rank runs the same number of forwards: ZeRO-3 gathers parameters collectively inside each
    forward and would hang otherwise. The predictor's modules run in eval mode and get their
    previous mode back afterwards.

    Args:
        predictor: A :class:`Predictor` or :class:`Ensemble` fed with the dataset's images
            (raw ``uint8`` when it normalises them itself); a bare :class:`SegmentationTask`
            is evaluated whole-image on images the dataset already standardised. A
            :class:`MultiPredictor` (the TTA sweep) gets one set of metrics per output.
        dataset: Items ``{"image": [3, H, W], "mask": int64 [H, W], "name": str}``.
        device: This rank's device.
        rank: This rank.
        world_size: Number of ranks.
        class_names: One name per class.
        protocol: The scoring settings used here (default: ``EvalProtocol()``): ``batch_size``
            (images of a batch must share their size), ``max_images`` and the boundary IoU band;
            the predictor carries the rest.
        ignore_index: Mask value never scored.
        refiner: Optional refinement of the predictions (needs raw ``uint8`` images); the
            coarse predictions are scored too.
        num_panels: How many of the dataset's first images to keep for the report (gathered
            onto every rank, so the report does not depend on the number of processes).

    Returns:
        The metrics (all-reduced, identical on every rank) and the panels.

    Raises:
        DataError: If an item has no mask (e.g. the hidden-label Test split) or the images of
            a batch differ in size.
        ConfigError: If a refiner is given with a :class:`MultiPredictor`.
    """
    predictor = as_predictor(predictor)
    multi = isinstance(predictor, MultiPredictor)
    if multi and refiner is not None:
        raise ConfigError("refinement scores one protocol; a predictor of several protocols (the TTA sweep) "
                          "cannot be refined")
    protocol = protocol or EvalProtocol()
    batch_size = protocol.batch_size
    num_images = len(dataset) if protocol.max_images is None else min(protocol.max_images, len(dataset))
    indices = eval_shard(num_images, rank=rank, world_size=world_size)
    steps = eval_batches_per_rank(num_images, world_size=world_size, batch_size=batch_size)
    meter_args = dict(class_names=class_names, ignore_index=ignore_index, device=device,
                      boundary_width=protocol.boundary_width, boundary_dilation_ratio=protocol.boundary_dilation_ratio)
    finals = [_Meters(**meter_args) for _ in range(predictor.num_outputs if multi else 1)]
    coarse = _Meters(**meter_args) if refiner is not None else None
    panels: list[tuple[int, Panel]] = []
    with eval_mode(predictor):
        forwards_before = predictor.forwards_run
        no_forwards = [0] * len(predictor.forward_counts(1, 1, 1))
        for step in range(steps):
            chunk = indices[step * batch_size:(step + 1) * batch_size]
            samples = [dataset[i] for i in chunk]
            for sample in samples:
                if "mask" not in sample:
                    raise DataError(f"evaluation needs ground truth, but item {sample.get('name', '?')!r} has no mask")
            sizes = {tuple(s["image"].shape) for s in samples}
            if len(sizes) > 1:
                raise DataError(f"batch_size={batch_size} needs images of one size, got {sorted(sizes)} for "
                                f"{[s.get('name', '?') for s in samples]}; use batch_size=1")
            images = torch.stack([s["image"] for s in samples]).to(device) if samples else None
            mine = predictor.forward_counts(len(samples), *images.shape[-2:]) if samples else no_forwards
            needed = _max_over_ranks(mine, device, world_size)
            if samples:
                masks = torch.stack([s["mask"] for s in samples]).to(device)
                if multi:
                    predictions = predictor.predict_each(images)
                elif refiner is None:
                    predictions = [predictor.predict(images)]
                else:
                    probabilities = predictor.probabilities(images)
                    coarse.update(probabilities.argmax(dim=1), masks)
                    predictions = [refiner.refine(images, probabilities, valid=masks != ignore_index)]
                for meters, prediction in zip(finals, predictions, strict=True):
                    meters.update(prediction, masks)
                prediction = predictions[0]
                for index, sample, pred in zip(chunk, samples, prediction):
                    if index < num_panels:
                        panels.append((index, Panel(str(sample.get("name", index)), sample["image"].cpu(),
                                                    sample["mask"].cpu(), pred.cpu())))
            predictor.pad_forwards([n - m for n, m in zip(needed, mine)], device)
        outputs = [meters.finish() for meters in finals]
        return EvaluationResult(outputs[0], coarse.finish() if coarse is not None else None,
                                _gather_panels(panels, world_size) if num_panels else [],
                                predictor.forwards_run - forwards_before, outputs)


def _gather_panels(panels: list[tuple[int, Panel]], world_size: int) -> list[Panel]:
    if world_size > 1 and dist.is_initialized():
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, panels)
        panels = [item for part in gathered for item in part]
    return [panel for _, panel in sorted(panels, key=lambda item: item[0])]

