"""The learning-rate schedule: linear warmup then cosine, polynomial or constant decay.

DeepSpeed JSON configs carry no scheduler; this one sets every group's learning rate itself,
``lr = base_lr × group['lr_scale'] × factor(step)``, once per optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("cosine", "poly", "constant")


@dataclass(frozen=True)
class LRSchedule:
    """Learning-rate factor as a pure function of the optimizer step (so resuming is exact)."""

    base_lr: float
    total_steps: int
    kind: str = "poly"  # cosine | poly | constant
    warmup_steps: int = 0
    warmup_start_factor: float = 1e-3
    min_lr_ratio: float = 0.0
    poly_power: float = 1.0

    def factor(self, step: int) -> float:
        """Multiplier of ``base_lr`` at optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            progress = step / self.warmup_steps
            return self.warmup_start_factor + (1.0 - self.warmup_start_factor) * progress
        if self.kind == "constant":
            return 1.0
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        if self.kind == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = (1.0 - progress) ** self.poly_power
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set each group's learning rate for ``step``; returns the unscaled learning rate."""
        lr = self.base_lr * self.factor(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr
