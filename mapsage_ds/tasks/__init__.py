"""Tasks own the forward pass and the loss; the trainer owns the loop."""

from mapsage_ds.tasks.segmentation import SegmentationTask

__all__ = ["SegmentationTask"]
