"""Device discovery and distributed start-up. The only module that knows vendor device APIs.

Every process binds the card of its ``LOCAL_RANK`` and joins the process group on the backend
that belongs to its device (``nccl`` for CUDA, ``gloo`` for CPU). A requested device that is
missing, or a backend that does not come up, is an error: there is no fallback to CPU, gloo or
one card.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch

from mapsage_ds.errors import AcceleratorError

# device type -> (collective backend, DeepSpeed accelerator name)
_BACKENDS = {"cuda": ("nccl", "cuda"), "cpu": ("gloo", "cpu")}
ENV_ACCELERATOR = "MAPSAGE_ACCELERATOR"


@dataclass(frozen=True)
class DistributedContext:
    """Where this process runs within the job."""

    device: torch.device
    backend: str
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        """True on global rank 0, the process that writes shared files."""
        return self.rank == 0


def detect_accelerator(requested: str | None = None) -> str:
    """Device type to run on: ``requested``, else ``$MAPSAGE_ACCELERATOR``, else the best present.

    Raises:
        AcceleratorError: if the requested device type is unknown or not present.
    """
    requested = requested or os.environ.get(ENV_ACCELERATOR) or None
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested not in _BACKENDS:
        raise AcceleratorError(f"unknown accelerator '{requested}': expected one of {', '.join(_BACKENDS)}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise AcceleratorError("accelerator 'cuda' was requested but torch.cuda.is_available() is False")
    return requested


def _install_deepspeed_accelerator(device_type: str) -> None:
    """Make DeepSpeed use the accelerator we chose instead of its own guess."""
    os.environ["DS_ACCELERATOR"] = _BACKENDS[device_type][1]
    from deepspeed.accelerator import get_accelerator, set_accelerator

    if get_accelerator().device_name() != device_type:
        if device_type == "cuda":
            from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator as Accelerator
        else:
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator as Accelerator
        set_accelerator(Accelerator())
    if get_accelerator().device_name() != device_type:
        raise AcceleratorError(f"DeepSpeed accelerator is '{get_accelerator().device_name()}', expected '{device_type}'")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def setup_distributed(requested: str | None = None) -> DistributedContext:
    """Bind this process to its device and join the process group through DeepSpeed.

    Launched by ``deepspeed`` or ``torchrun``, ranks come from the environment. Run as plain
    ``python`` (no ``RANK`` in the environment), the process forms a world of one on localhost,
    so that single-process runs go through the same DeepSpeed path as the 8-card server.
    """
    device_type = detect_accelerator(requested)
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))

    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise AcceleratorError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    _install_deepspeed_accelerator(device_type)
    import deepspeed
    import torch.distributed as dist

    backend = _BACKENDS[device_type][0]
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    actual = dist.get_backend()
    if actual != backend:
        raise AcceleratorError(f"process group came up on backend '{actual}', expected '{backend}'")
    return DistributedContext(device, backend, rank, local_rank, world_size)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (for honest timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """Host and device RNG states of this process."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["device"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["device"], device)
