"""DeepSpeed accelerator for Enflame GCU cards over the PyTorch-2 ``torch_gcu`` (device ``gcu``, backend ``eccl``).

DeepSpeed has no GCU accelerator of its own, so this module supplies one: a
:class:`~deepspeed.accelerator.abstract_accelerator.DeepSpeedAccelerator` whose every method maps
onto ``torch.gcu``. ``mapsage_ds.runtime.accelerator`` installs it with
``deepspeed.accelerator.set_accelerator`` before the process group and the engine exist.

Fused DeepSpeed ops are CUDA/CPU kernels that cannot be built for GCU: the accelerator reports
no op builders, and the run configs use torch optimizers. The older T20 software stack
(TopsRider 2.5: ``torch_gcu`` 1.10 on PyTorch 1.10, cards as XLA devices) is refused with an
error; it can run neither current DeepSpeed nor transformers.

Nothing here knows about the CPU stand-in of ``torch_gcu`` used by the tests; the stand-in adapts
this class itself (``tests/fake_torch_gcu``). See ``docs/accelerators.md``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import torch
from deepspeed.accelerator.abstract_accelerator import DeepSpeedAccelerator

from mapsage_ds.errors import AcceleratorError

VENDOR_MODULE = "torch_gcu"
DEVICE_TYPE = "gcu"
BACKEND = "eccl"
VISIBLE_DEVICES_ENV = "TOPS_VISIBLE_DEVICES"
# Variables of Enflame's stack that every rank must see alike: ECCL (collectives), TOPS runtime,
# torch_gcu's own switches, the caching allocator, EFRT runtime and ENFLAME logging.
EXPORT_ENV_PREFIXES = ("ECCL", "TOPS", "TORCH_ECCL", "TORCHGCU", "TORCH_GCU", "PYTORCH_GCU_ALLOC_CONF", "EFRT",
                       "ENFLAME")
# torch.compile on GCU: Enflame's graph compiler when installed (DeepLink dicp registers it as
# "topsgraph"); Enflame's stacks otherwise run eager with Inductor switched off
# (TORCHGCU_INDUCTOR_ENABLE=0), and torch_gcu's Inductor integration is used only when switched on.
TOPS_COMPILE_BACKEND = "topsgraph"
INDUCTOR_SWITCH = "TORCHGCU_INDUCTOR_ENABLE"
_REQUIREMENT = ("a PyTorch-2 torch_gcu (TopsRider with torch_gcu 2.x built for this torch, which provides the "
                "'gcu' device, torch.gcu and the 'eccl' backend) is required")


def torch_gcu_installed() -> bool:
    """Whether a ``torch_gcu`` package can be found (without importing it)."""
    return importlib.util.find_spec(VENDOR_MODULE) is not None


def load_torch_gcu() -> ModuleType:
    """Import ``torch_gcu`` and check that it is the PyTorch-2 generation.

    Returns:
        The ``torch_gcu`` module; ``torch.gcu`` exists afterwards.

    Raises:
        AcceleratorError: if it is not installed, fails to import, or is the older XLA-style
            ``torch_gcu`` 1.x (no ``torch.gcu`` namespace).
    """
    spec = importlib.util.find_spec(VENDOR_MODULE)
    if spec is None:
        raise AcceleratorError(f"the {VENDOR_MODULE} package is not installed: {_REQUIREMENT}")
    try:
        module = importlib.import_module(VENDOR_MODULE)
    except Exception as error:  # a vendor binary built for another torch fails in many ways
        raise AcceleratorError(
            f"{VENDOR_MODULE} at {spec.origin} failed to import under torch {torch.__version__}: {error!r}; "
            f"{_REQUIREMENT}"
        ) from error
    version = getattr(module, "__version__", "unknown version")
    if int(torch.__version__.split(".")[0]) < 2 or not isinstance(getattr(torch, DEVICE_TYPE, None), ModuleType):
        style = " and exposes XLA-style devices (torch_gcu.gcu_device())" if hasattr(module, "gcu_device") else ""
        raise AcceleratorError(
            f"{VENDOR_MODULE} {version} at {spec.origin} registers no torch.gcu namespace{style}: this is the "
            f"older T20 stack (torch_gcu 1.10 on PyTorch 1.10, XLA devices), which cannot run current DeepSpeed "
            f"or transformers; {_REQUIREMENT}"
        )
    return module


class GCUAccelerator(DeepSpeedAccelerator):
    """DeepSpeed's view of Enflame GCU cards: device ``gcu``, collective backend ``eccl``.

    Every device query, RNG, stream, event and memory call is forwarded to ``torch.gcu``; a
    function this ``torch_gcu`` lacks raises :class:`AcceleratorError` naming it when DeepSpeed
    first needs it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.vendor = load_torch_gcu()
        self._gcu = getattr(torch, DEVICE_TYPE)
        self._name = DEVICE_TYPE
        self._communication_backend_name = BACKEND
        self._compile_backend: str | None = None  # chosen on first use: listing backends imports dynamo

    def _api(self, name: str) -> Callable[..., Any]:
        try:
            return getattr(self._gcu, name)
        except AttributeError:
            raise AcceleratorError(
                f"torch.gcu.{name} is not provided by {VENDOR_MODULE} "
                f"{getattr(self.vendor, '__version__', '')}, and DeepSpeed needs it"
            ) from None

    # Execution model
    def is_synchronized_device(self) -> bool:
        return False  # kernels run asynchronously on the card's streams

    def use_host_timers(self) -> bool:
        return self.is_synchronized_device()

    def resolves_data_dependency(self) -> bool:
        return self.is_synchronized_device()

    def handles_memory_backpressure(self) -> bool:
        return self.is_synchronized_device()

    # Device APIs
    def device_name(self, device_index: int | None = None) -> str:
        if device_index is None:
            return DEVICE_TYPE
        return f"{DEVICE_TYPE}:{device_index}"

    def device(self, device_index: int | None = None) -> torch.device:
        return torch.device(self.device_name(device_index))

    def set_device(self, device_index: int) -> None:
        self._api("set_device")(device_index)

    def current_device(self) -> int:
        return self._api("current_device")()

    def current_device_name(self) -> str:
        return self.device_name(self.current_device())

    def device_count(self) -> int:
        return self._api("device_count")()

    def synchronize(self, device_index: int | None = None) -> None:
        return self._api("synchronize")(device_index)

    # RNG APIs
    def random(self) -> ModuleType:
        return torch.random

    def set_rng_state(self, new_state: torch.Tensor, device_index: int | None = None) -> None:
        if device_index is None:
            return self._api("set_rng_state")(new_state)
        return self._api("set_rng_state")(new_state, device_index)

    def get_rng_state(self, device_index: int | None = None) -> torch.Tensor:
        if device_index is None:
            return self._api("get_rng_state")()
        return self._api("get_rng_state")(device_index)

    def manual_seed(self, seed: int) -> None:
        return self._api("manual_seed")(seed)

    def manual_seed_all(self, seed: int) -> None:
        return self._api("manual_seed_all")(seed)

    def initial_seed(self) -> int:
        return self._api("initial_seed")()

    def default_generator(self, device_index: int) -> torch.Generator:
        return self._api("default_generators")[device_index]

    # Streams and events
    @property
    def Stream(self) -> type:  # noqa: N802 - DeepSpeed's name
        return self._api("Stream")

    def stream(self, stream: Any) -> Any:
        return self._api("stream")(stream)

    def current_stream(self, device_index: int | None = None) -> Any:
        return self._api("current_stream")(device_index)

    def default_stream(self, device_index: int | None = None) -> Any:
        return self._api("default_stream")(device_index)

    @property
    def Event(self) -> type:  # noqa: N802 - DeepSpeed's name
        return self._api("Event")

    # Memory management
    def empty_cache(self) -> None:
        return self._api("empty_cache")()

    def memory_allocated(self, device_index: int | None = None) -> int:
        return self._api("memory_allocated")(device_index)

    def max_memory_allocated(self, device_index: int | None = None) -> int:
        return self._api("max_memory_allocated")(device_index)

    def reset_max_memory_allocated(self, device_index: int | None = None) -> None:
        return self._api("reset_peak_memory_stats")(device_index)

    def memory_cached(self, device_index: int | None = None) -> int:
        return self._api("memory_reserved")(device_index)

    def max_memory_cached(self, device_index: int | None = None) -> int:
        return self._api("max_memory_reserved")(device_index)

    def reset_max_memory_cached(self, device_index: int | None = None) -> None:
        return self._api("reset_peak_memory_stats")(device_index)

    def memory_stats(self, device_index: int | None = None) -> dict[str, Any]:
        return self._api("memory_stats")(device_index)

    def reset_peak_memory_stats(self, device_index: int | None = None) -> None:
        return self._api("reset_peak_memory_stats")(device_index)

    def memory_reserved(self, device_index: int | None = None) -> int:
        return self._api("memory_reserved")(device_index)

    def max_memory_reserved(self, device_index: int | None = None) -> int:
        return self._api("max_memory_reserved")(device_index)

    def total_memory(self, device_index: int | None = None) -> int:
        return self._api("get_device_properties")(device_index).total_memory

    def available_memory(self, device_index: int | None = None) -> int:
        free, _total = self._api("mem_get_info")(device_index)
        return free

    # Data types
    def is_bf16_supported(self) -> bool:
        query = getattr(self._gcu, "is_bf16_supported", None)
        return True if query is None else bool(query())

    def is_fp16_supported(self) -> bool:
        # GCU cards compute in fp16 natively; a torch_gcu that can say otherwise is asked.
        query = getattr(self._gcu, "is_fp16_supported", None)
        return True if query is None else bool(query())

    def supported_dtypes(self) -> list[torch.dtype]:
        dtypes = [torch.float]
        if self.is_bf16_supported():
            dtypes.append(torch.bfloat16)
        if self.is_fp16_supported():
            dtypes.append(torch.half)
        return dtypes

    # Misc
    def is_available(self) -> bool:
        return self._api("is_available")()

    def range_push(self, msg: str, domain: Any = None, category: Any = None) -> None:
        return None  # no GCU range markers; the torch profiler traces GCU activity itself

    def range_pop(self, domain: Any = None) -> None:
        return None

    def lazy_call(self, callback: Callable[[], Any]) -> Any:
        lazy = getattr(self._gcu, "_lazy_call", None)
        return callback() if lazy is None else lazy(callback)

    def communication_backend_name(self) -> str:
        return self._communication_backend_name

    def is_triton_supported(self) -> bool:
        return False

    # Graph operations
    def create_graph(self) -> Any:
        return self._api("GCUGraph")()

    def capture_to_graph(self, graph: Any, pool: Any = None, stream: Any = None) -> Any:
        return self._api("graph")(graph, pool, stream)

    def replay_graph(self, graph: Any) -> None:
        graph.replay()

    # Tensor operations
    def _tensor(self, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
        return functools.partial(torch.tensor, dtype=dtype, device=DEVICE_TYPE)

    @property
    def BFloat16Tensor(self) -> Callable[..., torch.Tensor]:  # noqa: N802 - DeepSpeed's name
        return self._tensor(torch.bfloat16)

    @property
    def ByteTensor(self) -> Callable[..., torch.Tensor]:  # noqa: N802
        return self._tensor(torch.uint8)

    @property
    def DoubleTensor(self) -> Callable[..., torch.Tensor]:  # noqa: N802
        return self._tensor(torch.double)

    @property
    def FloatTensor(self) -> Callable[..., torch.Tensor]:  # noqa: N802
        return self._tensor(torch.float)

    @property
    def HalfTensor(self) -> Callable[..., torch.Tensor]:  # noqa: N802
        return self._tensor(torch.half)

    @property
    def IntTensor(self) -> Callable[..., torch.Tensor]:  # noqa: N802
        return self._tensor(torch.int)

    @property
    def LongTensor(self) -> Callable[..., torch.Tensor]:  # noqa: N802
        return self._tensor(torch.long)

    # Pinned host memory: torch pins for the current accelerator.
    def _torch_pin_memory(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory()

    def _torch_empty_pinned(self, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return tensor.new_empty(shape, pin_memory=True)

    def on_accelerator(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == DEVICE_TYPE

    # Op builders: none. DeepSpeed's fused kernels are CUDA/CPU code; runs use torch optimizers.
    def op_builder_dir(self) -> str:
        return "deepspeed.ops.op_builder"

    def create_op_builder(self, class_name: str) -> None:
        return None

    def get_op_builder(self, class_name: str) -> None:
        return None

    def build_extension(self) -> type:
        from torch.utils.cpp_extension import BuildExtension

        return BuildExtension

    # Launcher environment
    def export_envs(self) -> list[str]:
        return list(EXPORT_ENV_PREFIXES)

    def visible_devices_envs(self) -> list[str]:
        return [VISIBLE_DEVICES_ENV]

    def set_visible_devices_envs(self, current_env: dict[str, str], local_accelerator_ids: list[int]) -> None:
        for name in self.visible_devices_envs():
            current_env[name] = ",".join(map(str, local_accelerator_ids))

    def get_compile_backend(self) -> str:
        if self._compile_backend is None:
            self._compile_backend = default_compile_backend()
        return self._compile_backend

    def set_compile_backend(self, backend: str) -> None:
        supported = torch._dynamo.list_backends(exclude_tags=())
        if backend not in supported:
            raise AcceleratorError(f"compile backend '{backend}' is not available for gcu: expected one of {supported}")
        self._compile_backend = backend


def default_compile_backend(environ: Mapping[str, str] | None = None) -> str:
    """The ``torch.compile`` backend DeepSpeed uses on GCU unless told otherwise.

    ``topsgraph`` (Enflame's graph compiler) when a package has registered it with dynamo; else
    ``inductor`` only if ``TORCHGCU_INDUCTOR_ENABLE=1`` switches torch_gcu's Inductor integration on;
    else ``eager`` (graph capture without code generation), because Enflame's own stacks run with
    Inductor off on GCU.
    """
    environ = os.environ if environ is None else environ
    if TOPS_COMPILE_BACKEND in torch._dynamo.list_backends(exclude_tags=()):
        return TOPS_COMPILE_BACKEND
    if environ.get(INDUCTOR_SWITCH, "").strip().lower() in ("1", "true", "on", "yes"):
        return "inductor"
    return "eager"
