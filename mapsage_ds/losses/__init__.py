"""Segmentation losses: pure maths in ``functional``, one module per loss, and their weighted composite."""

from mapsage_ds.losses.boundary import BoundaryLoss
from mapsage_ds.losses.composite import PART_NAMES, CompositeLoss, build_loss
from mapsage_ds.losses.cross_entropy import CrossEntropyLoss
from mapsage_ds.losses.dice import DiceLoss
from mapsage_ds.losses.lovasz import LovaszSoftmaxLoss
from mapsage_ds.losses.ohem import OhemCrossEntropyLoss

__all__ = [
    "PART_NAMES",
    "BoundaryLoss",
    "CompositeLoss",
    "CrossEntropyLoss",
    "DiceLoss",
    "LovaszSoftmaxLoss",
    "OhemCrossEntropyLoss",
    "build_loss",
]
