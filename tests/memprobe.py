"""Measure training memory on any device, CPU included: the ground truth the planner is checked against.

Activation memory is measured as the bytes of the distinct storages autograd saves for backward
(``torch.autograd.graph.saved_tensors_hooks``), which does not depend on a device allocator.
Parameters and buffers seen by the hooks (a linear layer saves its weight) are not activations and
are left out. Parameter, gradient and optimizer-state bytes are read off the live tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Sum of ``numel × element_size`` over the tensors that are not None."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def saved_activation_bytes(module: nn.Module, forward: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd keeps for backward while ``forward()`` runs; backward is then run to free them.

    Each storage counts once however many saved tensors view it; storages of ``module``'s
    parameters and buffers are excluded.

    Args:
        module: the model whose parameters and buffers are not activations.
        forward: runs the forward pass and returns the scalar loss.
    """
    excluded = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = forward()
    loss.backward()
    return sum(storages.values())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, keys: Iterable[str] = ("exp_avg", "exp_avg_sq")) -> int:
    """Bytes of the named per-parameter state tensors of a torch optimizer (Adam moments by default)."""
    keys = tuple(keys)
    return sum(tensor_bytes(state.get(key) for key in keys) for state in optimizer.state.values())


class PeakAnonymousMemory:
    """Peak growth of this process's anonymous resident memory (``RssAnon``) while the block runs.

    Sampled every millisecond from ``/proc/self/status`` by a thread. Anonymous memory is what
    tensors allocate; file pages (a memory-mapped safetensors file being read) are not counted.
    Use: ``with PeakAnonymousMemory() as peak: ...; peak.growth`` (bytes above the level at entry).
    """

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s, self.growth = interval_s, 0

    @staticmethod
    def current() -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")

    def __enter__(self) -> PeakAnonymousMemory:
        import threading

        self._start, self._peak, self._stop = self.current(), 0, threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self._peak = max(self._peak, self.current())
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.growth = max(self._peak, self.current()) - self._start
