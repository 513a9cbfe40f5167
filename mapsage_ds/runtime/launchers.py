"""Where a process sits in its job: rank, local rank, world size and rendezvous, from whatever launched it.

``torchrun`` and the ``deepspeed`` launcher set ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` (and
``MASTER_ADDR``/``MASTER_PORT``). MPI and batch-system launchers set their own variables instead
(rank, world size; local rank, ranks or nodes of this node; job id):

- OpenMPI ``mpirun`` (also ``deepspeed --launcher openmpi``): ``OMPI_COMM_WORLD_RANK``,
  ``OMPI_COMM_WORLD_SIZE``; ``OMPI_COMM_WORLD_LOCAL_RANK``, ``OMPI_COMM_WORLD_LOCAL_SIZE``;
  ``OMPI_MCA_ess_base_jobid``.
- MVAPICH2 (``deepspeed --launcher mvapich``): ``MV2_COMM_WORLD_RANK``, ``MV2_COMM_WORLD_SIZE``;
  ``MV2_COMM_WORLD_LOCAL_RANK``, ``MV2_COMM_WORLD_LOCAL_SIZE``; no job id.
- PMI (MPICH / Intel MPI hydra): ``PMI_RANK``, ``PMI_SIZE``; ``MPI_LOCALRANKID``,
  ``MPI_LOCALNRANKS``; no job id.
- SLURM ``srun`` (also ``deepspeed --launcher slurm``): ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``
  (else ``SLURM_NTASKS``); ``SLURM_LOCALID``, ``SLURM_STEP_NUM_NODES`` (else ``SLURM_NNODES``);
  ``SLURM_JOB_ID`` and ``SLURM_STEP_ID``.

The first family present in that order is used. ``RANK`` (a torch-style launcher) wins over all
of them, because ``srun``/``mpirun`` may start one ``torchrun`` per node; but a ``WORLD_SIZE`` of
one while a launcher says the job has more processes is refused: each process would train alone as
rank 0 on card 0, writing the same files.

The rendezvous is explicit. ``MASTER_ADDR``/``MASTER_PORT`` from the environment win. Otherwise
the address is ``127.0.0.1`` when the launcher says every rank is on one node, the first host of
SLURM's node list for a multi-node ``srun`` (checked on rank 0 against ``SLURMD_NODENAME``), and
an error for a multi-node MPI job (DeepSpeed's ``mpi_discovery`` needs ``mpi4py`` to broadcast rank
0's address; here the user says it). The port is derived from the launcher's job id, so that two
jobs on one host do not meet on one port, else it must be given. Ranks come from the launcher, so
two processes of one job never both become rank 0.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mapsage_ds.errors import AcceleratorError, ConfigError
from mapsage_ds.runtime.network import free_port

TORCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LOOPBACK = "127.0.0.1"
PORT_BASE, PORT_SPAN = 20000, 10000  # derived ports stay below Linux's ephemeral range (32768+)
DEEPSPEED_ENV_FILE = ".deepspeed_env"
# Forwarded to every node besides the accelerator's own prefixes: the device choice and gloo's interface.
ALWAYS_EXPORTED = ("MAPSAGE_", "GLOO_")


@dataclass(frozen=True)
class LauncherFamily:
    """The environment variables one launcher family sets in every process it starts.

    Attributes:
        name: How the launcher is reported (``openmpi``, ``mvapich``, ``pmi``, ``slurm``).
        rank: Variable holding the global rank; its presence says this launcher started the process.
        world_size: Variables holding the number of processes, the first one set is used.
        local_rank: Variable holding the rank among the processes on this node.
        local_world_size: Variable holding the number of processes on this node, if the family has one.
        nodes: Variables holding the number of nodes, if the family has them.
        job_id: Variables whose values together identify the job (for a per-job port).
        hint: How to pass ``MASTER_ADDR``/``MASTER_PORT`` to the processes of this launcher.
    """

    name: str
    rank: str
    world_size: tuple[str, ...]
    local_rank: str
    local_world_size: str | None = None
    nodes: tuple[str, ...] = ()
    job_id: tuple[str, ...] = ()
    hint: str = ""


FAMILIES = (
    LauncherFamily("openmpi", "OMPI_COMM_WORLD_RANK", ("OMPI_COMM_WORLD_SIZE",), "OMPI_COMM_WORLD_LOCAL_RANK",
                   "OMPI_COMM_WORLD_LOCAL_SIZE", job_id=("OMPI_MCA_ess_base_jobid",),
                   hint="mpirun -x MASTER_ADDR=<host of rank 0> -x MASTER_PORT=<port>, or MASTER_ADDR=... in "
                        ".deepspeed_env for `deepspeed --launcher openmpi`"),
    LauncherFamily("mvapich", "MV2_COMM_WORLD_RANK", ("MV2_COMM_WORLD_SIZE",), "MV2_COMM_WORLD_LOCAL_RANK",
                   "MV2_COMM_WORLD_LOCAL_SIZE",
                   hint="mpirun -env MASTER_ADDR <host of rank 0> -env MASTER_PORT <port>, or MASTER_ADDR=... in "
                        ".deepspeed_env for `deepspeed --launcher mvapich`"),
    LauncherFamily("pmi", "PMI_RANK", ("PMI_SIZE",), "MPI_LOCALRANKID", "MPI_LOCALNRANKS",
                   hint="mpiexec -genv MASTER_ADDR <host of rank 0> -genv MASTER_PORT <port>"),
    LauncherFamily("slurm", "SLURM_PROCID", ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"), "SLURM_LOCALID",
                   nodes=("SLURM_STEP_NUM_NODES", "SLURM_NNODES"), job_id=("SLURM_JOB_ID", "SLURM_STEP_ID"),
                   hint="srun --export=ALL,MASTER_ADDR=<host of rank 0>,MASTER_PORT=<port>"),
)


@dataclass(frozen=True)
class LauncherWorld:
    """What a launcher's variables say about this process.

    Attributes:
        launcher: The family's name.
        rank: Global rank.
        local_rank: Rank among the processes on this node (the card it binds).
        world_size: Number of processes in the job.
        single_node: True if every process is on this node, False if not, None if the variables do not say.
        job_id: The launcher's job identity, None if it has none.
        source: The variables read, ``NAME=value`` each, for messages.
    """

    launcher: str
    rank: int
    local_rank: int
    world_size: int
    single_node: bool | None
    job_id: str | None
    source: str


@dataclass(frozen=True)
class WorldEnvironment:
    """The torch-style variables this process joins its process group with.

    Attributes:
        launcher: ``torch`` (``RANK`` was set), ``none`` (a world of one) or a launcher family's name.
    """

    rank: int
    local_rank: int
    world_size: int
    master_addr: str | None
    master_port: str | None
    launcher: str

    def variables(self) -> dict[str, str]:
        """``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and the rendezvous, for ``os.environ``."""
        values = {"RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank), "WORLD_SIZE": str(self.world_size)}
        if self.master_addr is not None:
            values["MASTER_ADDR"] = self.master_addr
        if self.master_port is not None:
            values["MASTER_PORT"] = self.master_port
        return values


def _integer(environ: Mapping[str, str], name: str, why: str) -> int:
    value = environ.get(name)
    if value is None or not value.strip().isdigit():
        raise AcceleratorError(f"{name}={value!r} in the environment: expected a non-negative integer ({why})")
    return int(value)


def _first_set(environ: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    return next((name for name in names if environ.get(name, "").strip()), None)


def launcher_world(environ: Mapping[str, str]) -> LauncherWorld | None:
    """The rank, local rank and world size an MPI or SLURM launcher gave this process, if one started it.

    Args:
        environ: The process environment (``os.environ``).

    Returns:
        What the first family present (OpenMPI, MVAPICH, PMI, SLURM) says, or None if none is.

    Raises:
        AcceleratorError: if the family's variables are incomplete, not integers, or contradict
            each other (a rank not below the world size, more ranks on this node than in the job).
    """
    family = next((f for f in FAMILIES if f.rank in environ), None)
    if family is None:
        return None
    why = f"{family.rank} is set, so {family.name} started this process"
    size_name = _first_set(environ, family.world_size)
    if size_name is None:
        raise AcceleratorError(f"{family.rank}={environ[family.rank]!r} is set but {' / '.join(family.world_size)} "
                               f"is not: the {family.name} launcher's variables are incomplete")
    rank = _integer(environ, family.rank, why)
    world_size = _integer(environ, size_name, why)
    read = {family.rank: rank, size_name: world_size}
    if world_size < 1 or rank >= world_size:
        raise AcceleratorError(f"{family.rank}={rank} with {size_name}={world_size}: the rank must be below the "
                               f"world size ({family.name} launcher)")
    if family.local_rank in environ:
        local_rank = read[family.local_rank] = _integer(environ, family.local_rank, why)
    elif world_size == 1:
        local_rank = 0
    else:
        raise AcceleratorError(
            f"{family.rank}={rank} of {size_name}={world_size} but {family.local_rank} is not set, so this process "
            f"cannot tell which card is its own: set LOCAL_RANK with the launcher, or start the ranks with torchrun")
    single_node = None
    if family.local_world_size and family.local_world_size in environ:
        local_size = read[family.local_world_size] = _integer(environ, family.local_world_size, why)
        if not local_rank < local_size <= world_size:
            raise AcceleratorError(f"{family.local_rank}={local_rank}, {family.local_world_size}={local_size}, "
                                   f"{size_name}={world_size}: expected local rank < ranks on this node <= world size")
        single_node = local_size == world_size
    elif local_rank >= world_size:
        raise AcceleratorError(f"{family.local_rank}={local_rank} with {size_name}={world_size}: a local rank "
                               f"cannot reach the world size")
    nodes_name = _first_set(environ, family.nodes)
    if nodes_name is not None:
        nodes = read[nodes_name] = _integer(environ, nodes_name, why)
        if not 1 <= nodes <= world_size:
            raise AcceleratorError(f"{nodes_name}={nodes} with {size_name}={world_size}: expected 1..world size nodes")
        single_node = nodes == 1
    job_id = None
    if family.job_id and environ.get(family.job_id[0], "").strip():
        job_id = ".".join(environ[name].strip() for name in family.job_id if environ.get(name, "").strip())
    source = ", ".join(f"{name}={value}" for name, value in read.items())
    return LauncherWorld(family.name, rank, local_rank, world_size, single_node, job_id, source)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: ``node[03-05,9],gpu1`` → ``node03``, ``rack[1-2]-n[07-08]`` → ``rack1-n07``.

    Raises:
        ConfigError: if the list is empty or its brackets do not close.
    """
    text = nodelist.strip()
    depth = 0
    for index, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            break
        if char == "," and depth == 0:
            text = text[:index]
            break
    if not text or depth not in (0, 1) or text.count("[") != text.count("]"):
        raise ConfigError(f"SLURM node list {nodelist!r}: cannot read its first host")
    host = re.sub(r"\[([^\[\]]*)\]", lambda match: re.split(r"[,-]", match.group(1))[0], text)
    if not host or "[" in host or "]" in host:
        raise ConfigError(f"SLURM node list {nodelist!r}: cannot read its first host")
    return host


def derived_port(launcher: str, job_id: str) -> int:
    """A port every rank of one job computes alike and another job most likely does not."""
    return PORT_BASE + zlib.crc32(f"{launcher}:{job_id}".encode()) % PORT_SPAN


def _rendezvous(world: LauncherWorld, environ: Mapping[str, str]) -> tuple[str, str]:
    family = next(f for f in FAMILIES if f.name == world.launcher)
    address = environ.get("MASTER_ADDR", "").strip()
    if not address:
        nodelist_name = _first_set(environ, ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
        if world.single_node:
            address = LOOPBACK
        elif world.launcher == "slurm" and nodelist_name is not None:
            address = first_host(environ[nodelist_name])
            here = environ.get("SLURMD_NODENAME", "").strip()
            if world.rank == 0 and here and here != address:
                raise AcceleratorError(
                    f"rank 0 runs on {here}, not on {address}, the first host of {nodelist_name}="
                    f"{environ[nodelist_name]} where the other ranks look for it: set MASTER_ADDR={here} "
                    f"({family.hint})")
        else:
            spread = "spread over several nodes" if world.single_node is False else "not known to share one node"
            raise AcceleratorError(
                f"{world.launcher} started {world.world_size} processes ({world.source}), {spread}, and MASTER_ADDR is "
                f"not set, so the ranks cannot find rank 0: set MASTER_ADDR to the address of the host of rank 0 "
                f"({family.hint})")
    port = environ.get("MASTER_PORT", "").strip()
    if not port:
        if world.job_id is None:
            raise AcceleratorError(
                f"{world.launcher} started {world.world_size} processes ({world.source}) without MASTER_PORT, and it "
                f"gives no job id to derive a port from: set MASTER_PORT to a free port, the same for every rank "
                f"({family.hint})")
        port = str(derived_port(world.launcher, world.job_id))
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise AcceleratorError(f"MASTER_PORT={port!r}: expected a TCP port number")
    return address, port


def world_environment(environ: Mapping[str, str]) -> WorldEnvironment:
    """How this process joins its job, from the torch-style variables or a launcher's own.

    Args:
        environ: The process environment (``os.environ``); not changed.

    Returns:
        ``RANK`` & co. when set (``torchrun``, ``deepspeed``); else the rank, local rank, world size and
        rendezvous an MPI or SLURM launcher implies; else a world of one on a free loopback port.

    Raises:
        AcceleratorError: if the variables are incomplete or inconsistent, if a launcher says the job
            has several processes while ``WORLD_SIZE`` says one, or if the rendezvous of a launcher's
            job is not known (see the module docstring).
    """
    world = launcher_world(environ)
    if "RANK" in environ:
        why = "RANK is set, so this process was launched; torchrun and the deepspeed launcher set RANK, LOCAL_RANK " \
              "and WORLD_SIZE"
        rank, local_rank = _integer(environ, "RANK", why), _integer(environ, "LOCAL_RANK", why)
        world_size = _integer(environ, "WORLD_SIZE", why)
        if world_size == 1 and world is not None and world.world_size > 1:
            raise AcceleratorError(
                f"WORLD_SIZE=1 (RANK={rank}) but {world.launcher} started {world.world_size} processes "
                f"({world.source}): each would train alone as rank 0 and write the same files. Start one torchrun "
                f"per node with --nnodes/--node_rank, or drop RANK/WORLD_SIZE and let the ranks come from "
                f"{world.launcher}")
        return WorldEnvironment(rank, local_rank, world_size, environ.get("MASTER_ADDR"), environ.get("MASTER_PORT"),
                                "torch")
    if world is not None:
        if world.world_size == 1:
            address = environ.get("MASTER_ADDR") or LOOPBACK
            return WorldEnvironment(0, 0, 1, address, environ.get("MASTER_PORT") or str(free_port()), world.launcher)
        address, port = _rendezvous(world, environ)
        return WorldEnvironment(world.rank, world.local_rank, world.world_size, address, port, world.launcher)
    address = environ.get("MASTER_ADDR") or LOOPBACK
    return WorldEnvironment(0, 0, 1, address, environ.get("MASTER_PORT") or str(free_port()), "none")


def deepspeed_env_lines(prefixes: list[str] | tuple[str, ...], environ: Mapping[str, str]) -> list[str]:
    """``NAME=value`` lines of the variables the ``deepspeed`` launcher should carry to every node.

    The launcher forwards only its own prefixes and those of the accelerator *it* detects, which is
    DeepSpeed's CPU accelerator on a GCU server; ``.deepspeed_env`` carries the rest.

    Args:
        prefixes: Variable-name prefixes of the accelerator (its ``export_envs()``); ``MAPSAGE_`` and
            ``GLOO_`` are always added.
        environ: The environment to copy the values from.

    Raises:
        ConfigError: if a value holds a line break (the file is read line by line).
    """
    wanted = tuple(dict.fromkeys([*prefixes, *ALWAYS_EXPORTED]))
    lines = []
    for name in sorted(environ):
        if not name.startswith(wanted):
            continue
        value = environ[name]
        if "\n" in value or "\r" in value:
            raise ConfigError(f"environment variable {name} holds a line break, which {DEEPSPEED_ENV_FILE} "
                              f"cannot carry")
        lines.append(f"{name}={value}")
    return lines


def write_deepspeed_env(path: str | Path, prefixes: list[str] | tuple[str, ...],
                        environ: Mapping[str, str] | None = None) -> list[str]:
    """Write ``path`` (a ``.deepspeed_env``) with the variables of :func:`deepspeed_env_lines`; returns the lines.

    The ``deepspeed`` launcher reads ``./.deepspeed_env`` and ``~/.deepspeed_env`` (the name can be
    changed with ``DS_ENV_FILE``) and exports each line on every node.
    """
    lines = deepspeed_env_lines(prefixes, os.environ if environ is None else environ)
    Path(path).write_text("".join(line + "\n" for line in lines))
    return lines


# What tells a process which world it belongs to: torch's variables and each launcher's.
LAUNCHER_PREFIXES = ("OMPI_COMM_WORLD_", "OMPI_MCA_ess_base_jobid", "MV2_COMM_WORLD_", "PMI_", "MPI_LOCAL", "SLURM_")


def without_world_variables(environ: Mapping[str, str], extra: tuple[str, ...] = ()) -> dict[str, str]:
    """``environ`` without the variables that place a process in a world (torch's and every launcher's).

    For processes that must form worlds of their own: a track's process group, a test's launch.
    """
    names = set(TORCH_VARIABLES) | set(extra)
    return {k: v for k, v in environ.items() if k not in names and not k.startswith(LAUNCHER_PREFIXES)}
