"""Commands: one module per command.

Each has ``main(argv)``, which returns its result (for tests and callers), and ``console``, the
console-script entry point, which returns the exit status.

A command that stops on a :class:`~mapsage_ds.errors.MapSageError` prints ``error: <message>``
to stderr, without a traceback, and exits with the error's ``exit_status`` (2: a usage, config or
data error the user can fix; 1: the run failed). ``--debug`` anywhere on the command line, or
``MAPSAGE_DEBUG=1`` in the environment, lets the exception propagate with its traceback.
Unexpected exceptions (bugs, Ctrl-C) always keep theirs.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping

from mapsage_ds.errors import FailedOnAnotherRank, MapSageError
from mapsage_ds.runtime.launchers import launcher_world

DEBUG_FLAG = "--debug"
DEBUG_VARIABLE = "MAPSAGE_DEBUG"
# torchrun and the deepspeed launcher stop every rank as soon as one exits with an error: a rank that
# leaves the message to another waits this long first, so that the other is not stopped before it prints.
SILENT_RANK_EXIT_DELAY_S = 3.0


def as_console(main: Callable[[list[str]], object], *, returns_status: bool = False) -> Callable[[], int]:
    """The console-script entry point of ``main``.

    It calls ``main(argv)`` with the command line less ``--debug`` and returns ``main``'s own
    status when ``returns_status``, else 0 once done; a :class:`MapSageError` is printed by
    :func:`report_error` and its ``exit_status`` returned (unless debugging, see the module docstring).
    """

    def console() -> int:
        argv = sys.argv[1:]
        debug = DEBUG_FLAG in argv or debug_requested(os.environ)
        argv = [arg for arg in argv if arg != DEBUG_FLAG]
        try:
            result = main(argv)
        except MapSageError as error:
            if debug:
                raise
            report_error(error)
            return error.exit_status
        return int(result) if returns_status else 0

    console.__doc__ = f"Console-script entry point of {main.__module__}."
    return console


def debug_requested(environ: Mapping[str, str]) -> bool:
    """Whether ``MAPSAGE_DEBUG`` asks for tracebacks (set, and not ``0``/``false``/``no``/``off``)."""
    return environ.get(DEBUG_VARIABLE, "").strip().lower() not in ("", "0", "false", "no", "off")


def report_error(error: MapSageError) -> None:
    """Print ``error`` to stderr as ``error: <message>``, once per job.

    Under several ranks a :class:`FailedOnAnotherRank` is not printed (its rank printed the cause),
    an error raised identically by every rank (``same_on_every_rank``) is printed by rank 0 only,
    and any other error by the rank that raised it, prefixed with ``[rank N]``. A rank that prints
    nothing waits :data:`SILENT_RANK_EXIT_DELAY_S` before returning.
    """
    rank, world_size = process_rank()
    message = format_error(error, rank=rank, world_size=world_size)
    if message is not None:
        sys.stdout.flush()  # the error comes after whatever the command printed before it
        print(message, file=sys.stderr, flush=True)
    elif world_size > 1:
        time.sleep(SILENT_RANK_EXIT_DELAY_S)


def format_error(error: MapSageError, *, rank: int, world_size: int) -> str | None:
    """The line(s) ``rank`` prints for ``error``, or None when another rank prints them (see :func:`report_error`)."""
    if isinstance(error, FailedOnAnotherRank):
        return None
    if error.same_on_every_rank:
        return None if rank != 0 else f"error: {_message(error)}"
    prefix = f"[rank {rank}] " if world_size > 1 else ""
    return f"{prefix}error: {_message(error)}"


def _message(error: MapSageError) -> str:
    return str(error) or type(error).__name__


def process_rank() -> tuple[int, int]:
    """The global rank and world size of this process, for messages; ``(0, 1)`` when it was not launched.

    The process group's when one is up, else the launcher's variables: torch-style ``RANK`` and
    ``WORLD_SIZE``, then an MPI or SLURM launcher's. Never raises: broken variables count as a world of one
    (the command's own error says what is wrong with them).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    environ = os.environ
    if "RANK" in environ:
        try:
            return int(environ["RANK"]), int(environ.get("WORLD_SIZE", "1"))
        except ValueError:
            return 0, 1
    try:
        world = launcher_world(environ)
    except MapSageError:
        return 0, 1
    return (0, 1) if world is None else (world.rank, world.world_size)
