"""Run logging on rank 0: a progress bar, ``metrics.jsonl`` and TensorBoard event files."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from mapsage_ds.files import json_safe, write_text_atomic


class RunLogger:
    """Writes scalars to ``{output_dir}/metrics.jsonl`` and ``{output_dir}/tensorboard``.

    On ranks other than 0 every method does nothing, so the loop can call it unconditionally.
    A resumed run (``resumed_step``) first cuts both back to that step, so the steps it repeats
    are not recorded twice.
    """

    def __init__(self, output_dir: str | Path, *, enabled: bool, total_steps: int,
                 resumed_step: int | None = None) -> None:
        self.enabled = enabled
        if not enabled:
            return
        output_dir = Path(output_dir)
        if resumed_step is not None:
            truncate_records(output_dir / "metrics.jsonl", after_step=resumed_step)
        self._jsonl = (output_dir / "metrics.jsonl").open("a")
        # TensorBoard drops the events at and after purge_step of the previous writers.
        self._writer = SummaryWriter(str(output_dir / "tensorboard"),
                                     purge_step=None if resumed_step is None else resumed_step + 1)
        self._bar = tqdm(total=total_steps, initial=resumed_step or 0, desc="train", dynamic_ncols=True)

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


def truncate_records(path: Path, *, after_step: int) -> int:
    """Drop the rows of a ``metrics.jsonl`` past ``after_step`` (and a torn last line); returns how many."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            keep = json.loads(line)["step"] <= after_step
        except (ValueError, KeyError, TypeError):
            keep = False  # a line cut short by the crash
        if keep:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        write_text_atomic(path, "".join(kept))
    return dropped
