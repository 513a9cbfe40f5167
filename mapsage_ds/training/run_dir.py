"""Ownership of a run's output directory: one run at a time, never another run's outputs.

``run.json`` marks the directory as a run's and carries its id, which every checkpoint's
manifest repeats (see :mod:`mapsage_ds.runtime.checkpoint`). ``.lock`` is held with ``flock``
while the run is alive: the kernel drops it when the process dies, so a lock file whose
holder is gone is recognised as stale and named. A fresh run into a directory that holds
another run is refused unless it is resumed (``--resume``) or replaced (``--overwrite``).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from mapsage_ds.errors import OutputDirectoryError
from mapsage_ds.files import write_json

RUN_MARKER = "run.json"
LOCK_FILE = ".lock"
# What a run writes; --overwrite removes exactly these (a bootstrapped teacher/ and other files stay).
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "tensorboard", "checkpoints", "best", "export", RUN_MARKER)


@dataclass
class OwnedRunDirectory:
    """An output directory this process holds: its path, run id and lock.

    Attributes:
        path: the output directory.
        run_id: this run's id (kept across ``--resume``).
        notes: what the claim found and did (a stale lock taken over, a previous run removed).
    """

    path: Path
    run_id: str
    notes: list[str] = field(default_factory=list)
    _lock_fd: int | None = None

    def release(self) -> None:
        """Empty and unlock ``.lock`` (an empty lock file means nobody holds it)."""
        if self._lock_fd is None:
            return
        os.ftruncate(self._lock_fd, 0)
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)
        self._lock_fd = None


def read_run_id(path: str | Path) -> str | None:
    """The run id in ``{path}/run.json``; None when the directory holds no run."""
    marker = Path(path) / RUN_MARKER
    if not marker.is_file():
        return None
    try:
        return str(json.loads(marker.read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise OutputDirectoryError(f"{marker}: unreadable run marker ({error}); expected JSON with a "
                                   f"'run_id'") from error


def _prepare(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise OutputDirectoryError(f"output_dir {path} exists and is not a directory: pass --output-dir with a "
                                   f"directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise OutputDirectoryError(f"output_dir {path} cannot be written ({error.strerror or error}): pass "
                                   f"--output-dir with a writable directory") from error


def _take_lock(path: Path) -> tuple[int, str | None]:
    """Hold ``.lock``; returns its descriptor and a note when a dead process's lock was taken over."""
    lock = path / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno not in (errno.EAGAIN, errno.EACCES):
            raise OutputDirectoryError(f"{lock}: cannot lock it ({error.strerror}); the output directory must be on "
                                       f"a file system with flock support") from error
        raise OutputDirectoryError(f"output_dir {path} is in use by another run ({_describe_holder(previous)}): "
                                   f"wait for it to finish "
                                   f"or pass another --output-dir") from error
    stale = f"took over a stale lock in {lock}: {_describe_holder(previous)}, which is no longer running" \
        if previous else None
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    return fd, stale


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return f"holder unknown ({text.strip()[:80]!r})"


def claim_output_dir(path: str | Path, *, resume: bool, overwrite: bool,
                     outputs: tuple[str, ...] = RUN_OUTPUTS) -> OwnedRunDirectory:
    """Lock ``path`` for this run and decide whose outputs it holds (call on rank 0 only).

    A fresh run needs a directory without another run's outputs; ``resume`` needs the run's
    own ``run.json``; ``overwrite`` removes the previous run's ``outputs`` (by default a training
    run's, :data:`RUN_OUTPUTS`; a plan has its own).

    Raises:
        OutputDirectoryError: the path is a file or unwritable, another live run holds it, or it
            holds another run and neither ``resume`` nor ``overwrite`` was given.
    """
    if resume and overwrite:
        raise OutputDirectoryError("--resume and --overwrite contradict each other: pick one")
    path = Path(path)
    _prepare(path)
    fd, stale = _take_lock(path)
    owned = OwnedRunDirectory(path=path, run_id="", _lock_fd=fd)
    try:
        if stale:
            owned.notes.append(stale)
        run_id = read_run_id(path)
        present = [name for name in dict.fromkeys((*outputs, RUN_MARKER)) if (path / name).exists()]
        if resume:
            if run_id is None and not present:
                raise OutputDirectoryError(f"--resume: no checkpoint in {path}: no run was started there")
            if run_id is None:
                raise OutputDirectoryError(
                    f"--resume: {path} holds no run ({RUN_MARKER} is missing), so none of its files are trusted "
                    f"for resuming; start a fresh run (to start from weights, set model.pretrained)")
            owned.run_id = run_id
            return owned
        if present and not overwrite:
            what = f"run {run_id}" if run_id else "another run's outputs"
            raise OutputDirectoryError(
                f"output_dir {path} already holds {what} ({', '.join(present)}): pass --resume to continue it, "
                f"--overwrite to replace it, or another --output-dir")
        for name in present:
            target = path / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        if present:
            owned.notes.append(f"--overwrite: removed the previous run's {', '.join(present)} from {path}")
        owned.run_id = uuid.uuid4().hex
        write_json(path / RUN_MARKER, {"run_id": owned.run_id, "created": _now(), "host": socket.gethostname()})
        return owned
    except BaseException:
        owned.release()
        raise


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
