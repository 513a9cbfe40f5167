"""Run logging on rank 0: a progress bar, ``metrics.jsonl`` and TensorBoard event files."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from mapsage_ds.files import json_safe


class RunLogger:
    """Writes scalars to ``{output_dir}/metrics.jsonl`` and ``{output_dir}/tensorboard``.

    On ranks other than 0 every method does nothing, so the loop can call it unconditionally.
    """

    def __init__(self, output_dir: str | Path, *, enabled: bool, total_steps: int, initial_step: int = 0) -> None:
        self.enabled = enabled
        if not enabled:
            return
        output_dir = Path(output_dir)
        self._jsonl = (output_dir / "metrics.jsonl").open("a")
        self._writer = SummaryWriter(str(output_dir / "tensorboard"))
        self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)

    def log(self, step: int, kind: str, values: dict[str, Any]) -> None:
        """Record ``values`` (scalars, or lists for per-class entries) at ``step``."""
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, "time": time.time(), **values}
        # A non-finite loss is logged as null: metrics.jsonl stays strict JSON, line by line.
        self._jsonl.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self._jsonl.flush()
        for key, value in values.items():
            if isinstance(value, int | float):
                self._writer.add_scalar(f"{kind}/{key}", value, step)

    def advance(self, step: int, postfix: dict[str, float]) -> None:
        """Move the progress bar to ``step``."""
        if not self.enabled:
            return
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def message(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if self.enabled:
            self._bar.write(text)

    def close(self) -> None:
        """Flush and close every sink."""
        if self.enabled:
            self._bar.close()
            self._writer.close()
            self._jsonl.close()
