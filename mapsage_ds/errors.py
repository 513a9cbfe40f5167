"""Exceptions raised for bad user input and for runs that must stop.

Every error names the file, key or value at fault and says what was expected, so that a
misconfigured run stops at once instead of training on the wrong thing. The commands print
a :class:`MapSageError` as one line (no traceback) and exit with its ``exit_status``: 2 for a
usage, config or data error the user can fix, 1 for a run that failed.
"""

import contextlib
from collections.abc import Iterator


class MapSageError(Exception):
    """Base class of all MapSage DS errors.

    Attributes:
        exit_status: the command's exit status when this error ends it.
        same_on_every_rank: raised identically by every rank (a config error, a collective
            check), so only rank 0 prints it; otherwise each rank that raises it prints it.
    """

    exit_status = 1
    same_on_every_rank = False


class ConfigError(MapSageError, ValueError):
    """A configuration key or value is unknown, mistyped or inconsistent."""

    exit_status = 2


class DataError(MapSageError, ValueError):
    """A dataset file is unreadable, mismatched or holds unexpected values."""

    exit_status = 2


class MissingFileError(MapSageError, FileNotFoundError):
    """A file or directory the run needs does not exist."""

    exit_status = 2


class OutputDirectoryError(MapSageError, OSError):
    """An output directory is taken by another run, locked, unwritable or not a directory."""

    exit_status = 2


class CheckpointError(MapSageError, ValueError):
    """A checkpoint is incomplete, altered, or was not written by a MapSage DS run in this directory."""

    exit_status = 2


class AcceleratorError(MapSageError, RuntimeError):
    """The requested device or collective backend is not available."""


class TrainingError(MapSageError, RuntimeError):
    """Training cannot go on: non-finite losses or gradients, too many skipped steps."""


class StorageError(MapSageError, OSError):
    """Writing a result failed (a full disk, a lost mount); names the path and the space needed."""


class FailedOnAnotherRank(MapSageError):
    """Another rank failed and reported why; this rank stops without printing it a second time."""

    def __init__(self, rank: int, exit_status: int) -> None:
        super().__init__(f"rank {rank} failed (its message is printed above)")
        self.rank = rank
        self.exit_status = exit_status


def on_every_rank(error: MapSageError) -> MapSageError:
    """Mark ``error`` as raised identically by every rank (printed once, by rank 0); returns it."""
    error.same_on_every_rank = True
    return error


@contextlib.contextmanager
def raised_on_every_rank() -> Iterator[None]:
    """Mark project errors raised inside as :func:`on_every_rank` (also a decorator).

    For code every rank runs alike before any process group exists: parsing the same command
    line, reading the same config.
    """
    try:
        yield
    except MapSageError as error:
        on_every_rank(error)
        raise
