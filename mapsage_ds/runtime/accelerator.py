"""Device discovery and distributed start-up. The only module (with ``gcu_accelerator``) that knows device APIs.

The device type is chosen as ``--accelerator``, else ``$MAPSAGE_ACCELERATOR``, else the first
present of gcu (Enflame, PyTorch-2 ``torch_gcu``), cuda, cpu. DeepSpeed is told which accelerator
to use (``deepspeed.accelerator.set_accelerator``) before anything of it starts. Every process
binds the card of its ``LOCAL_RANK`` and joins the process group on the backend of its device
(``eccl`` for GCU, ``nccl`` for CUDA, ``gloo`` for CPU). A requested device that is missing, a
``LOCAL_RANK`` beyond the visible cards, or a backend that is not there is an error: there is no
fallback to CPU, gloo or one card. Ranks come from ``torchrun``/``deepspeed`` (``RANK``), or from an
MPI or SLURM launcher's own variables (``mapsage_ds.runtime.launchers``); a world of one while a
launcher says there are more processes is an error too. Each rank prints one
``[mapsage_ds.runtime.accelerator] {json}`` line saying where it runs.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mapsage_ds.errors import AcceleratorError
from mapsage_ds.runtime.launchers import world_environment

ACCELERATORS = ("gcu", "cuda", "cpu")  # detection order
BACKENDS = {"gcu": "eccl", "cuda": "nccl", "cpu": "gloo"}
VISIBLE_DEVICES_ENVS = {"gcu": "TOPS_VISIBLE_DEVICES", "cuda": "CUDA_VISIBLE_DEVICES"}
ENV_ACCELERATOR = "MAPSAGE_ACCELERATOR"
REPORT_PREFIX = "[mapsage_ds.runtime.accelerator] "


@dataclass(frozen=True)
class DistributedContext:
    """Where this process runs within the job.

    Attributes:
        device: Where this rank's tensors live.
        backend: The collective backend of the process group.
        accelerator: The device type chosen (``gcu``, ``cuda`` or ``cpu``).
        device_index: The card this rank bound (its ``LOCAL_RANK``); None on CPU.
        launcher: Where the ranks came from: ``torch`` (``RANK`` set by torchrun or deepspeed), an
            MPI/SLURM launcher's name (``openmpi``, ``mvapich``, ``pmi``, ``slurm``), or ``none``.
    """

    device: torch.device
    backend: str
    rank: int
    local_rank: int
    world_size: int
    accelerator: str = "cpu"
    device_index: int | None = None
    launcher: str = "none"

    @property
    def is_main(self) -> bool:
        """True on global rank 0, the process that writes shared files."""
        return self.rank == 0


def visible_devices_env(accelerator: str) -> str | None:
    """Environment variable that restricts which cards of ``accelerator`` a process sees (None for CPU)."""
    return VISIBLE_DEVICES_ENVS.get(accelerator)


def detect_accelerator(requested: str | None = None) -> str:
    """Device type to run on: ``requested``, else ``$MAPSAGE_ACCELERATOR``, else the first present.

    Raises:
        AcceleratorError: if the requested device type is unknown or not present, or if
            ``torch_gcu`` is installed but unusable (the old XLA generation, no card visible).
    """
    source = "--accelerator" if requested else ENV_ACCELERATOR
    requested = requested or os.environ.get(ENV_ACCELERATOR) or None
    if requested is None:
        return next(kind for kind in ACCELERATORS if _present(kind, requested=False))
    if requested not in ACCELERATORS:
        raise AcceleratorError(
            f"{source}: unknown accelerator '{requested}': expected one of {', '.join(ACCELERATORS)}"
        )
    _present(requested, requested=True)
    return requested


def _present(kind: str, *, requested: bool) -> bool:
    if kind == "cpu":
        return True
    if kind == "cuda":
        if torch.cuda.is_available():
            return True
        if requested:
            raise AcceleratorError(
                f"accelerator 'cuda' was requested but torch.cuda.is_available() is False (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda}, {_visible_note('cuda')})"
            )
        return False
    from mapsage_ds.runtime import gcu as gcu_accelerator

    if not gcu_accelerator.torch_gcu_installed():
        if requested:
            gcu_accelerator.load_torch_gcu()  # raises, naming the missing package and the requirement
        return False
    gcu_accelerator.load_torch_gcu()  # installed but unusable is an error even when not asked for
    if torch.gcu.is_available():
        return True
    hint = "" if requested else "; to run without GCU cards, say so with --accelerator cpu (or cuda)"
    raise AcceleratorError(
        f"torch_gcu is installed but torch.gcu.is_available() is False ({_visible_note('gcu')}): "
        f"check the driver and the cards{hint}"
    )


def _visible_note(kind: str) -> str:
    name = VISIBLE_DEVICES_ENVS[kind]
    return f"{name}={os.environ[name]}" if name in os.environ else f"{name} not set"


def check_card_selection(accelerator: str) -> None:
    """Refuse a card selection that the GCU runtime would ignore.

    The ``deepspeed`` launcher does not know GCU and restricts cards (``--include``/``--exclude``)
    through ``CUDA_VISIBLE_DEVICES``; the GCU runtime reads ``TOPS_VISIBLE_DEVICES`` only, so
    every rank would silently use the first cards instead.

    Raises:
        AcceleratorError: if ``CUDA_VISIBLE_DEVICES`` selects other cards than ``0..n-1`` and
            ``TOPS_VISIBLE_DEVICES`` does not select the same ones.
    """
    cuda_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if accelerator != "gcu" or not cuda_visible:
        return
    ids = [item.strip() for item in cuda_visible.split(",")]
    tops_visible = os.environ.get("TOPS_VISIBLE_DEVICES")
    if ids == [str(i) for i in range(len(ids))] or ids == [s.strip() for s in (tops_visible or "").split(",")]:
        return
    raise AcceleratorError(
        f"CUDA_VISIBLE_DEVICES={cuda_visible} selects cards, but the GCU runtime reads TOPS_VISIBLE_DEVICES "
        f"({tops_visible or 'not set'}), so the ranks would run on other cards than intended. The deepspeed "
        f"launcher sets CUDA_VISIBLE_DEVICES for --include/--exclude; instead set TOPS_VISIBLE_DEVICES={cuda_visible} "
        f"and launch with --num_gpus {len(ids)} (or torchrun --nproc_per_node {len(ids)})"
    )


def install_deepspeed_accelerator(accelerator: str) -> Any:
    """Make DeepSpeed use ``accelerator`` instead of its own guess; returns DeepSpeed's accelerator object.

    Must run before ``deepspeed.init_distributed`` and ``deepspeed.initialize``.
    """
    if accelerator != "gcu":
        os.environ["DS_ACCELERATOR"] = accelerator  # DeepSpeed knows cuda and cpu by name
    from deepspeed.accelerator import get_accelerator, set_accelerator

    if accelerator == "gcu":
        from mapsage_ds.runtime.gcu import GCUAccelerator

        if not isinstance(get_accelerator(), GCUAccelerator):
            set_accelerator(GCUAccelerator())
    elif get_accelerator()._name != accelerator:
        if accelerator == "cuda":
            from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator as Accelerator
        else:
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator as Accelerator
        set_accelerator(Accelerator())
    installed = get_accelerator()
    if installed._name != accelerator:
        raise AcceleratorError(f"DeepSpeed accelerator is '{installed._name}', expected '{accelerator}'")
    return installed


def bind_local_device(accel: Any, local_rank: int) -> tuple[torch.device, int | None]:
    """Make card ``local_rank`` the current device of DeepSpeed accelerator ``accel``.

    Returns:
        The device tensors go to, and the card index (None on CPU).

    Raises:
        AcceleratorError: if ``local_rank`` is not below the number of visible cards, or the
            binding did not take.
    """
    name = accel._name
    if name == "cpu":
        return torch.device("cpu"), None
    count = accel.device_count()
    if not 0 <= local_rank < count:
        raise AcceleratorError(
            f"LOCAL_RANK={local_rank} but only {count} {name} device(s) are visible ({_visible_note(name)}): "
            f"launch at most {count} processes per node, or make more cards visible"
        )
    accel.set_device(local_rank)
    current = accel.current_device()
    if current != local_rank:
        raise AcceleratorError(f"{name} set_device({local_rank}) did not take: the current device is {current}")
    return torch.device(accel.current_device_name()), local_rank


def check_backend_available(backend: str) -> None:
    """Raise :class:`AcceleratorError` unless torch.distributed can create ``backend`` process groups."""
    import torch.distributed as dist

    if not dist.is_available():
        raise AcceleratorError(f"this torch build has no torch.distributed, so backend '{backend}' is unavailable")
    if not dist.is_backend_available(backend):
        hint = " (torch_gcu registers it when imported)" if backend == BACKENDS["gcu"] else ""
        raise AcceleratorError(
            f"collective backend '{backend}' is not available{hint}; registered backends: "
            f"{', '.join(b for b in dist.Backend.backend_list if b != 'undefined')}"
        )




def setup_distributed(requested: str | None = None) -> DistributedContext:
    """Choose the device, bind this process to its card and join the process group through DeepSpeed.

    Launched by ``deepspeed`` or ``torchrun``, ranks come from the environment (``LOCAL_RANK`` is
    required). Launched by ``mpirun`` (OpenMPI, MVAPICH, hydra) or ``srun``, they come from that
    launcher's variables, and ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
    ``MASTER_PORT`` are set from them (see :mod:`mapsage_ds.runtime.launchers`). Run as plain
    ``python``, the process forms a world of one on localhost, so that single-process runs go
    through the same DeepSpeed path as the 8-card server.

    Raises:
        AcceleratorError: on any of the loud failures listed in the module docstring.
    """
    accelerator = detect_accelerator(requested)
    world = world_environment(os.environ)
    os.environ.update(world.variables())
    if world.world_size == 1:
        os.environ["LOCAL_WORLD_SIZE"] = "1"
    rank, local_rank, world_size = world.rank, world.local_rank, world.world_size

    check_card_selection(accelerator)
    backend = BACKENDS[accelerator]
    check_backend_available(backend)
    accel = install_deepspeed_accelerator(accelerator)
    device, device_index = bind_local_device(accel, local_rank)
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    actual = dist.get_backend()
    if actual != backend:
        raise AcceleratorError(f"process group came up on backend '{actual}', expected '{backend}'")
    ctx = DistributedContext(device, backend, rank, local_rank, world_size, accelerator, device_index,
                             world.launcher)
    # One write, so that the lines of ranks sharing a pipe do not interleave.
    sys.stdout.write(REPORT_PREFIX + json.dumps(describe(ctx, accel)) + "\n")
    sys.stdout.flush()
    return ctx


def describe(ctx: DistributedContext, accel: Any) -> dict[str, Any]:
    """What this rank runs on, as reported in its ``[mapsage_ds.runtime.accelerator]`` line."""
    env = visible_devices_env(ctx.accelerator)
    return {
        "rank": ctx.rank,
        "local_rank": ctx.local_rank,
        "world_size": ctx.world_size,
        "launcher": ctx.launcher,
        "accelerator": ctx.accelerator,
        "deepspeed_accelerator": f"{type(accel).__module__}.{type(accel).__qualname__}",
        "deepspeed_accelerator_name": accel._name,
        "backend": ctx.backend,
        "device": str(ctx.device),
        "device_index": ctx.device_index,
        "current_device": accel.current_device() if ctx.device_index is not None else None,
        "device_count": accel.device_count() if ctx.device_index is not None else None,
        "visible_devices_env": env,
        "visible_devices": os.environ.get(env) if env else None,
        "vendor_version": getattr(getattr(accel, "vendor", None), "__version__", None),
    }


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (for honest timings)."""
    if device.type != "cpu":
        torch.get_device_module(device).synchronize(device)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """Host and device RNG states of this process."""
    state = {"cpu": torch.get_rng_state()}
    if device.type != "cpu":
        state["device"] = torch.get_device_module(device).get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["cpu"])
    if device.type != "cpu":
        if "device" not in state:
            raise AcceleratorError(f"the saved RNG state has no device part, so it cannot be restored on {device}")
        torch.get_device_module(device).set_rng_state(state["device"], device)


def teardown_distributed() -> None:
    """Leave the process group and forget DeepSpeed's cached groups, so a later world starts clean.

    DeepSpeed keeps module-level handles to the groups of the first world (world, data-parallel,
    expert groups); once that world is destroyed they are stale and a second engine in the same
    process (a test, a notebook) fails to broadcast on them.
    """
    import torch.distributed as dist
    from deepspeed.utils import groups

    if dist.is_initialized():
        dist.destroy_process_group()
    for name, value in list(vars(groups).items()):
        if name.startswith("_") and name.endswith(("_GROUP", "_GROUP_RANKS")) and name.isupper():
            setattr(groups, name, {} if isinstance(value, dict) else None)
    groups.mesh_device = None


def describe_machine(device: torch.device) -> str:
    """One line naming this machine for benchmark records: CPU model, cores, and the accelerator if any."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cpu":
        return f"{cpu}, {os.cpu_count()} cores, no accelerator"
    module = torch.get_device_module(device)
    name = module.get_device_name(device) if hasattr(module, "get_device_name") else device.type
    return f"{cpu}, {os.cpu_count()} cores, {name}"
