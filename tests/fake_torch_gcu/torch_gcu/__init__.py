"""Stand-in for Enflame's PyTorch-2 ``torch_gcu``, mapping the GCU API onto the CPU. For tests only.

Put ``tests/fake_torch_gcu`` on ``PYTHONPATH`` and ``import torch_gcu`` behaves, as far as
``mapsage_ds`` and DeepSpeed can tell from Python, like the vendor package on a server with
``$FAKE_GCU_DEVICE_COUNT`` cards (default 8):

* ``torch.gcu`` is registered (attribute and ``sys.modules['torch.gcu']``) with ``is_available``,
  ``device_count``, ``set_device``/``current_device``/``device``, ``synchronize``, per-card RNG
  (``manual_seed[_all]``, ``seed``, ``initial_seed``, ``get/set_rng_state``, ``default_generators``),
  ``Stream``/``Event``/``stream``/``current_stream``/``default_stream``, memory statistics
  (``memory_allocated``, ``max_memory_allocated``, ``memory_reserved``, ``max_memory_reserved``,
  ``memory_stats``, ``reset_peak_memory_stats``, ``empty_cache``, ``mem_get_info``,
  ``get_device_properties(i).total_memory``), ``is_bf16_supported`` and ``get_device_name``;
* ``TOPS_VISIBLE_DEVICES`` restricts and renumbers the cards as the vendor runtime does, read at
  each call; an id outside ``0..FAKE_GCU_DEVICE_COUNT-1`` is an error;
* ``set_device`` rejects an index outside the visible cards, and ``current_device`` reports the
  one set, so each rank's binding is observable;
* the collective backend ``"eccl"`` is registered with ``torch.distributed.Backend.register_backend``
  and delegates to gloo (skipped when ``FAKE_GCU_ECCL=0``, to test the missing-backend error).

What it cannot do: a PrivateUse1 device cannot be backed by Python cheaply, so there is no tensor
device ``"gcu"`` here. Tensors stay on the CPU: on import, this module adapts
``mapsage_ds.runtime.gcu.GCUAccelerator`` (see :func:`_keep_tensors_on_the_host`) so that it places
tensors on ``cpu`` and acts as a synchronous device; the version string ends in ``+standin``, which
every rank's report line shows. Production code holds no branch for the stand-in.
Consequently the stand-in proves the contract between ``mapsage_ds``,
DeepSpeed and the ``torch.gcu`` API (detection, accelerator installation, LOCAL_RANK binding,
backend selection, the calls DeepSpeed makes), but not that any kernel, stream, memory figure or
ECCL collective works on real cards: memory statistics are zeros, streams and events are no-ops
with host timing, and collectives run on gloo.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist

__version__ = "2.14.1+standin"

_state = {"current": 0, "generators": {}}


def _physical_count() -> int:
    return int(os.environ.get("FAKE_GCU_DEVICE_COUNT", "8"))


def _visible_ids() -> list[int]:
    physical = _physical_count()
    raw = os.environ.get("TOPS_VISIBLE_DEVICES")
    if raw is None:
        return list(range(physical))
    ids = [int(item) for item in raw.split(",") if item.strip()]
    bad = [i for i in ids if not 0 <= i < physical]
    if bad:
        raise RuntimeError(f"TOPS_VISIBLE_DEVICES={raw}: no such card(s) {bad} ({physical} present)")
    return ids


def _index(device: int | str | torch.device | None) -> int:
    if device is None:
        return _state["current"]
    if isinstance(device, int):
        return device
    if isinstance(device, torch.device):
        return _state["current"] if device.index is None else device.index
    kind, _, index = str(device).partition(":")  # "gcu" or "gcu:N": not parseable by torch.device here
    if kind != "gcu":
        raise RuntimeError(f"not a gcu device: {device!r}")
    return int(index) if index else _state["current"]


def _checked(device: int | str | torch.device | None) -> int:
    index = _index(device)
    if not 0 <= index < device_count():
        raise RuntimeError(f"invalid gcu device {index}: {device_count()} visible")
    return index


def is_available() -> bool:
    return device_count() > 0


def device_count() -> int:
    return len(_visible_ids())


def set_device(device: int | str | torch.device) -> None:
    _state["current"] = _checked(device)


def current_device() -> int:
    return _state["current"]


def get_device_name(device: int | None = None) -> str:
    return f"Stand-in GCU (CPU) #{_visible_ids()[_checked(device)]}"


def synchronize(device: int | None = None) -> None:
    _checked(device)


@contextlib.contextmanager
def device(index: int):  # noqa: D401 - mirrors torch.cuda.device
    previous = _state["current"]
    set_device(index)
    try:
        yield
    finally:
        _state["current"] = previous


# RNG: one generator per visible card; the stand-in's tensor ops use the CPU generator, not these.
def _generator(device: int | None = None) -> torch.Generator:
    index = _checked(device)
    if index not in _state["generators"]:
        generator = torch.Generator()
        generator.manual_seed(torch.initial_seed() + index)
        _state["generators"][index] = generator
    return _state["generators"][index]


def manual_seed(seed: int) -> None:
    _generator().manual_seed(seed)


def manual_seed_all(seed: int) -> None:
    for index in range(device_count()):
        _generator(index).manual_seed(seed)


def seed() -> None:
    _generator().seed()


def initial_seed() -> int:
    return _generator().initial_seed()


def get_rng_state(device: int | str | torch.device | None = None) -> torch.Tensor:
    return _generator(_index(device)).get_state()


def set_rng_state(new_state: torch.Tensor, device: int | str | torch.device | None = None) -> None:
    _generator(_index(device)).set_state(new_state)


def _default_generators() -> tuple[torch.Generator, ...]:
    return tuple(_generator(i) for i in range(device_count()))


# Streams and events: host-side no-ops (the CPU is synchronous).
class Stream:
    def __init__(self, device: int | None = None, priority: int = 0) -> None:
        self.device = _checked(device)

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def wait_stream(self, stream: Stream) -> None:
        pass

    def wait_event(self, event: Event) -> None:
        pass

    def record_event(self, event: Event | None = None) -> Event:
        event = event or Event()
        event.record(self)
        return event


class Event:
    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        self.enable_timing = enable_timing
        self._time: float | None = None

    def record(self, stream: Stream | None = None) -> None:
        self._time = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Stream | None = None) -> None:
        pass

    def query(self) -> bool:
        return self._time is not None

    def elapsed_time(self, end: Event) -> float:
        if self._time is None or end._time is None:
            raise RuntimeError("both events must be recorded before elapsed_time")
        return (end._time - self._time) * 1000.0


_streams: dict[int, Stream] = {}


def default_stream(device: int | None = None) -> Stream:
    index = _checked(device)
    return _streams.setdefault(index, Stream(index))


def current_stream(device: int | None = None) -> Stream:
    return default_stream(device)


@contextlib.contextmanager
def stream(stream: Stream | None):
    yield stream


# Memory statistics: the stand-in has no device memory; every figure is zero.
@dataclass(frozen=True)
class _Properties:
    name: str
    total_memory: int


_TOTAL_MEMORY = 32 * 1024**3  # a T20 card


def get_device_properties(device: int | None = None) -> _Properties:
    return _Properties(get_device_name(device), _TOTAL_MEMORY)


def mem_get_info(device: int | None = None) -> tuple[int, int]:
    _checked(device)
    return _TOTAL_MEMORY, _TOTAL_MEMORY


def memory_allocated(device: int | None = None) -> int:
    _checked(device)
    return 0


max_memory_allocated = memory_reserved = max_memory_reserved = memory_allocated


def memory_stats(device: int | None = None) -> dict[str, int]:
    _checked(device)
    return {"allocated_bytes.all.current": 0, "allocated_bytes.all.peak": 0,
            "reserved_bytes.all.current": 0, "reserved_bytes.all.peak": 0}


def reset_peak_memory_stats(device: int | None = None) -> None:
    _checked(device)


def empty_cache() -> None:
    pass


def is_bf16_supported() -> bool:
    return True


def _register_torch_gcu() -> None:
    namespace = types.ModuleType("torch.gcu", "Stand-in torch.gcu namespace (see torch_gcu.__doc__).")
    for name in ("is_available", "device_count", "set_device", "current_device", "get_device_name", "synchronize",
                 "device", "manual_seed", "manual_seed_all", "seed", "initial_seed", "get_rng_state",
                 "set_rng_state", "Stream", "Event", "stream", "current_stream", "default_stream",
                 "get_device_properties", "mem_get_info", "memory_allocated", "max_memory_allocated",
                 "memory_reserved", "max_memory_reserved", "memory_stats", "reset_peak_memory_stats",
                 "empty_cache", "is_bf16_supported"):
        setattr(namespace, name, globals()[name])
    # A tuple in torch.cuda; a property here so that it follows TOPS_VISIBLE_DEVICES.
    namespace.__class__ = type("_GCUNamespace", (types.ModuleType,),
                               {"default_generators": property(lambda self: _default_generators())})
    torch.gcu = namespace
    sys.modules["torch.gcu"] = namespace


def _create_eccl(store: dist.Store, rank: int, size: int, timeout) -> dist.ProcessGroup:
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def _register_eccl() -> None:
    if os.environ.get("FAKE_GCU_ECCL", "1") == "0" or "eccl" in dist.Backend.backend_list:
        return
    dist.Backend.register_backend("eccl", _create_eccl, devices=["cpu"])


_register_torch_gcu()
_register_eccl()


def _keep_tensors_on_the_host() -> None:
    """Adapt MapSage's GCU accelerator to this stand-in, whose tensors live on the (synchronous) CPU.

    The accelerator imports this module while it is being constructed, so its methods are
    replaced on the class itself: every device query still reaches ``torch.gcu`` above, but tensors
    are created on ``cpu``, nothing is pinned, and DeepSpeed is told not to use side streams
    (CPU tensors cannot record on them).
    """
    try:
        from mapsage_ds.runtime import gcu
    except ImportError:  # imported outside mapsage_ds: nothing to adapt
        return
    accelerator = gcu.GCUAccelerator

    def device_name(self, device_index=None) -> str:
        return "cpu"

    def synchronous(self) -> bool:
        return True

    def host_tensor(self, dtype):
        return lambda *args, **kwargs: torch.tensor(*args, dtype=dtype, device="cpu", **kwargs)

    accelerator.device_name = device_name
    accelerator.is_synchronized_device = synchronous
    accelerator._tensor = host_tensor
    accelerator._torch_pin_memory = lambda self, tensor: tensor
    accelerator._torch_empty_pinned = lambda self, tensor, shape: tensor.new_empty(shape)
    accelerator.on_accelerator = lambda self, tensor: tensor.device.type == "cpu"


_keep_tensors_on_the_host()
