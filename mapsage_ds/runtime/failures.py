"""Failing together: a check one rank fails stops every rank, and the reason is printed once.

A rank that raises on its own leaves the others waiting in their next collective until the
launcher's timeout. Checks that can fail on some ranks only (a file one rank reads, a disk
write one rank does) end in :func:`raise_if_any_failed`, a collective every rank reaches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist

from mapsage_ds.errors import FailedOnAnotherRank, MapSageError


def raise_if_any_failed(error: MapSageError | None, *, on_failure: Callable[[], None] | None = None) -> None:
    """Collective: raise on every rank when ``error`` is set on any rank.

    The lowest failing rank raises its own error, which its command prints; every other rank
    raises :class:`~mapsage_ds.errors.FailedOnAnotherRank` with the same exit status, which is
    not printed. Without a process group this simply raises ``error`` when it is set.
    ``on_failure`` runs on every rank first when any failed (e.g. rank 0 removes a partial write).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if error is not None:
            if on_failure is not None:
                on_failure()
            raise error
        return
    reports: list[tuple[int, int] | None] = [None] * dist.get_world_size()
    mine = None if error is None else (dist.get_rank(), error.exit_status)
    dist.all_gather_object(reports, mine)
    failed = [report for report in reports if report is not None]
    if not failed:
        return
    if on_failure is not None:
        on_failure()
    first_rank, exit_status = min(failed)
    if first_rank == dist.get_rank():
        raise error
    raise FailedOnAnotherRank(first_rank, exit_status)
