"""Throughput over a whole logging window: images per second including the wait for data.

Timing only the last step of a window (as a progress bar's rate does) misses the steps that
waited on the loader and reads 25-40% optimistic on a starved stream. Here every step's wall
time is kept, split into the wait for the next batch and the rest, and the window's figure is
images over the sum of those times. Evaluation and checkpoints fall between steps and are not
counted: they are not training throughput.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class ThroughputWindow:
    """Step times of the current logging window.

    Attributes:
        images_per_step: images one optimizer step consumes across all ranks
            (micro-batch × accumulation × world size).
    """

    images_per_step: int
    _step_seconds: list[float] = field(default_factory=list)
    _data_seconds: float = 0.0

    def add_step(self, seconds: float, *, data_seconds: float) -> None:
        """Record one optimizer step that took ``seconds``, of which ``data_seconds`` waiting for batches."""
        self._step_seconds.append(seconds)
        self._data_seconds += data_seconds

    def summary(self, *, extra_seconds: float = 0.0) -> dict[str, float]:
        """The window's figures, then a fresh window.

        Args:
            extra_seconds: time the window's work took after its last step returned (waiting for
                the device at the logging step), added to the last step.

        Returns:
            ``images_per_s`` over the whole window, ``data_wait_share`` (fraction of the window
            spent waiting for batches), and ``step_s_p50`` / ``step_s_p90`` (seconds per step).
        """
        if not self._step_seconds:
            raise ValueError("no step recorded in this window")
        steps = list(self._step_seconds)
        steps[-1] += extra_seconds
        total = sum(steps)
        figures = {
            "images_per_s": len(steps) * self.images_per_step / total,
            "data_wait_share": self._data_seconds / total,
            "step_s_p50": statistics.median(steps),
            "step_s_p90": _quantile(steps, 0.9),
        }
        self._step_seconds, self._data_seconds = [], 0.0
        return figures


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), also for a single value."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
