"""Validation: the same whole-image protocol for every experiment, sharded across ranks."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from mapsage_ds.data.loaders import eval_batches_per_rank, eval_shard
from mapsage_ds.metrics import ConfusionMatrix, SegmentationMetrics
from mapsage_ds.tasks.segmentation import SegmentationTask


@torch.no_grad()
def evaluate(
    task: SegmentationTask,
    dataset: Dataset,
    *,
    device: torch.device,
    rank: int,
    world_size: int,
    class_names: list[str],
    ignore_index: int = 255,
    batch_size: int = 1,
    max_images: int | None = None,
) -> SegmentationMetrics:
    """Per-class IoU, mIoU, OA and F1 over ``dataset`` (normalised images, encoded masks).

    Each image is scored exactly once across ranks; ranks whose shard is shorter repeat a
    forward pass on their last batch and discard it, so every rank runs the same number of
    forwards (ZeRO-3 gathers parameters collectively and would hang otherwise).
    """
    num_images = len(dataset) if max_images is None else min(max_images, len(dataset))
    indices = eval_shard(num_images, rank=rank, world_size=world_size)
    steps = eval_batches_per_rank(num_images, world_size=world_size, batch_size=batch_size)
    confusion = ConfusionMatrix(len(class_names), ignore_index=ignore_index, device=device,
                                class_names=class_names)
    was_training = task.training
    task.eval()
    last_images = None
    for step in range(steps):
        chunk = indices[step * batch_size:(step + 1) * batch_size]
        if chunk:
            samples = [dataset[i] for i in chunk]
            images = torch.stack([s["image"] for s in samples]).to(device)
            masks = torch.stack([s["mask"] for s in samples]).to(device)
            confusion.update(task.predict(images).argmax(1), masks)
            last_images = images
        else:
            # Padding forward: keeps collectives in step, result discarded.
            task.predict(last_images if last_images is not None else _first_image(dataset, device))
    task.train(was_training)
    confusion.all_reduce()
    return confusion.compute()


def _first_image(dataset: Dataset, device: torch.device) -> torch.Tensor:
    return dataset[0]["image"].unsqueeze(0).to(device)
