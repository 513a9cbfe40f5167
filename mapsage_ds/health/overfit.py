"""Check 3 (second half): a no-augmentation small-batch overfit through the real DeepSpeed engine.

One fixed batch, centre crops, no augmentation, a constant learning rate: a model that cannot
drive the loss on a handful of images down within a few dozen steps has a broken pipeline
(labels, normalisation, a frozen or disconnected network, a learning rate of 0) and would waste
the whole run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from mapsage_ds.data.transforms import Normalize, pad_to
from mapsage_ds.evaluation.metrics import ConfusionMatrix
from mapsage_ds.health.result import CheckResult, failed, passed
from mapsage_ds.runtime.engine import build_optimizer, initialize_engine
from mapsage_ds.tasks import SegmentationTask


@dataclass(frozen=True)
class OverfitTrace:
    """Losses of every step (averaged over ranks) and the batch's mIoU afterwards."""

    losses: list[float]
    miou: float
    trainable_parameters: int


def centre_crop_batch(dataset: Dataset, indices: Sequence[int], *, crop_size: int,
                      normalize: Normalize) -> dict[str, torch.Tensor]:
    """A fixed batch of centre crops (padded where smaller; padded labels ignored), normalised, unaugmented."""
    images, masks = [], []
    for index in indices:
        item = dataset[index]
        image, mask = pad_to(item["image"], item["mask"], crop_size)
        top, left = (mask.shape[0] - crop_size) // 2, (mask.shape[1] - crop_size) // 2
        images.append(normalize(image[:, top:top + crop_size, left:left + crop_size]))
        masks.append(mask[top:top + crop_size, left:left + crop_size])
    return {"image": torch.stack(images), "mask": torch.stack(masks)}


def run_overfit(task: SegmentationTask, batch: dict[str, torch.Tensor], *, param_groups: list[dict[str, Any]],
                ds_config: dict[str, Any], lr: float,
                steps: int, num_classes: int, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                device: torch.device) -> OverfitTrace:
    """Train ``task`` on ``batch`` for ``steps`` steps at constant ``lr`` through DeepSpeed; a collective.

    ``ds_config`` must be filled for a micro batch of ``len(batch["image"])``; ``num_classes`` sizes
    the confusion matrix of the batch mIoU. Parameters with
    ``requires_grad=False`` stay frozen (as in the run's first phase). The engine is destroyed
    afterwards; ``task`` keeps the trained weights.
    """
    groups = param_groups
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    engine = initialize_engine(task, build_optimizer(groups, lr=lr, betas=betas, eps=eps), ds_config)
    batch = {k: v.to(device) for k, v in batch.items()}
    world_size = dist.get_world_size()
    losses = []
    try:
        engine.train()
        for _ in range(steps):
            loss = engine(batch)["loss"]
            engine.backward(loss)
            engine.step()
            value = loss.detach().float().clone()
            dist.all_reduce(value)
            losses.append(value.item() / world_size)
        engine.eval()
        with torch.no_grad():
            prediction = task.predict(batch["image"]).argmax(dim=1)
        miou = batch_miou(prediction, batch["mask"], num_classes=num_classes, ignore_index=task.ignore_index,
                          device=device)
    finally:
        engine.destroy()
    trainable = sum(p.numel() for g in groups for p in g["params"])
    return OverfitTrace(losses, miou, trainable)


def batch_miou(prediction: torch.Tensor, mask: torch.Tensor, *, num_classes: int, ignore_index: int,
               device: torch.device) -> float:
    """The mIoU of one batch (confusion matrices summed over ranks)."""
    confusion = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    confusion.update(prediction, mask)
    confusion.all_reduce()
    return confusion.compute().miou


def check_overfit(trace: OverfitTrace, *, factor: float, miou_threshold: float, lr: float) -> CheckResult:
    """PASS when the loss fell at least ``factor``-fold and the batch mIoU reached ``miou_threshold``.

    The final loss is the mean of the last tenth of the steps (at least one), so one lucky step
    does not pass the check.
    """
    name = "3.overfit"
    losses = trace.losses
    tail = losses[-max(1, len(losses) // 10):]
    first, last = losses[0], sum(tail) / len(tail)
    ratio = first / last if last > 0 else math.inf
    figure = f"loss {first:.3g} → {last:.3g} (÷{ratio:.2f}) in {len(losses)} steps, batch mIoU {trace.miou:.3f}"
    details = {"losses": losses, "ratio": ratio, "miou": trace.miou, "lr": lr, "factor": factor,
               "miou_threshold": miou_threshold, "trainable_parameters": trace.trainable_parameters}
    if not all(math.isfinite(v) for v in losses):
        return failed(name, figure, "the loss is not finite", "check the precision (fp16 overflow), the inputs "
                      "and the learning rate", **details)
    problems = []
    if ratio < factor:
        problems.append(f"the loss fell only ÷{ratio:.2f}, less than ÷{factor:g}")
    if not trace.miou >= miou_threshold:
        problems.append(f"batch mIoU {trace.miou:.3f} < {miou_threshold:g}")
    if problems:
        hint = "the learning rate is 0" if lr == 0 else (
            "check labels, normalisation, frozen layers and the learning rate (or raise --overfit-steps / "
            "--overfit-lr)")
        if trace.trainable_parameters == 0:
            hint = "no parameter is trainable"
        return failed(name, figure, "; ".join(problems) + f" at lr {lr:g}", hint, **details)
    return passed(name, figure, f"overfits one batch at lr {lr:g} through the DeepSpeed engine", **details)
