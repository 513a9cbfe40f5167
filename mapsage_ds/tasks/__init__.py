"""Tasks own the forward pass and the loss; the trainer owns the loop."""

from mapsage_ds.tasks.distill import DistillationTask
from mapsage_ds.tasks.factory import TASKS, build_task, finish_task
from mapsage_ds.tasks.segmentation import SegmentationTask

__all__ = ["TASKS", "DistillationTask", "SegmentationTask", "build_task", "finish_task"]
