"""Parameter groups and the learning-rate schedule."""

from mapsage_ds.optim.param_groups import build_param_groups
from mapsage_ds.optim.schedule import LRSchedule

__all__ = ["LRSchedule", "build_param_groups"]
