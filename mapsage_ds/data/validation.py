"""Decode every sample of a dataset once, before training, and remember what passed.

A truncated PNG or a mask holding 9 otherwise surfaces only when its sample is drawn, possibly
hours into a run and again after every resume. :func:`validate_dataset` runs the dataset's own
loading checks on every item up front, in a thread pool (PIL and zlib release the GIL), and
records each item that passed in a JSON cache under ``$XDG_CACHE_HOME/mapsage_ds/validated``,
keyed by a stamp of its content, so a later start decodes only what changed.

A dataset takes part by answering two questions (:class:`Validatable`):

* ``validation_scope()``: what the cache file is for, e.g. ``"loveda /data/LoveDA Train"``.
* ``check_items()``: one :class:`CheckItem` per file or row, with the stamp of its content and
  the check that decodes it.

Stamps:

* LoveDA trees (the official layout or mmseg's ``img_dir``/``ann_dir``, each with its own scope):
  one item per image and per mask file, keyed by its path relative to the root, stamped with
  ``(size, mtime_ns)``: touching or rewriting a file checks it again, and only it.
* Hugging Face datasets: one item per row; every row carries the same stamp, made of the
  dataset's fingerprint (``datasets.Dataset._fingerprint``), the ``(size, mtime_ns)`` of its
  Arrow cache files and of the files under its path, and the columns and mask encoding in use.
  Any change to the dataset checks every row again. Rows that refer to image *files* by path
  are not re-checked when only those outside files change.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch.distributed as dist
from tqdm.auto import tqdm

from mapsage_ds.errors import DataError, MapSageError
from mapsage_ds.files import write_json

# Bumped whenever the checks themselves change, so that items passed by older checks are checked again.
CACHE_VERSION = 1
MAX_LISTED_FAILURES = 20
_DEFAULT_WORKERS = 8


@dataclass(frozen=True)
class CheckItem:
    """One file or row to validate.

    Attributes:
        key: Its name in the cache, stable across runs (a path relative to the root, a row index).
        stamp: The version of its content; a cached key with another stamp is checked again.
        source: Where it is, for messages (an absolute path, ``"<path> row 17"``).
        check: Decodes it exactly as loading does; raises (a ``DataError``, usually) if it is broken.
    """

    key: str
    stamp: str
    source: str
    check: Callable[[], object]


@runtime_checkable
class Validatable(Protocol):
    """A dataset that can list its files or rows for :func:`validate_dataset`."""

    def validation_scope(self) -> str:
        """What the items belong to (source kind, resolved root, split): one cache file per scope."""
        ...

    def check_items(self) -> list[CheckItem]:
        """Every file or row of the dataset, in a fixed order."""
        ...


@dataclass(frozen=True)
class ValidationReport:
    """The outcome of :func:`validate_dataset`; the same on every rank.

    Attributes:
        scope: The dataset's validation scope.
        checked: Number of items (files or rows) the dataset has.
        decoded: Number of items decoded this time, over all ranks; the others passed before
            with the same stamp (cache hits).
        failures: One message per broken item, naming it and what is wrong, sorted.
        cache_file: The cache file of this scope, or None without a cache.
    """

    scope: str
    checked: int
    decoded: int
    failures: tuple[str, ...]
    cache_file: Path | None

    @property
    def ok(self) -> bool:
        """Whether every item passed."""
        return not self.failures


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/mapsage_ds/validated`` (``~/.cache/mapsage_ds/validated`` when it is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mapsage_ds" / "validated"


def cache_file_for(scope: str, cache_dir: str | Path) -> Path:
    """The cache file of ``scope`` in ``cache_dir`` (named by a hash of the scope)."""
    return Path(cache_dir) / f"{hashlib.sha256(scope.encode()).hexdigest()[:24]}.json"


def file_stamp(path: Path) -> str:
    """``"size:mtime_ns"`` of ``path``: changes when the file is rewritten or touched."""
    try:
        stat = path.stat()
    except OSError:
        # Gone since it was listed: its check will fail and name it (a raise here would desert the other ranks).
        return "unreadable"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _read_cache(path: Path, scope: str) -> dict[str, str]:
    # A cache only saves time: an unreadable or foreign one is ignored, and everything is checked.
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or data.get("scope") != scope:
        return {}
    validated = data.get("validated")
    if not isinstance(validated, dict):
        return {}
    return {str(k): str(v) for k, v in validated.items()}


def _write_cache(path: Path, scope: str, old: dict[str, str], keys: set[str], passed: dict[str, str]) -> None:
    # Entries of keys outside this dataset stay (another scenes selection of the same split).
    merged = {k: v for k, v in old.items() if k not in keys} | passed
    if merged == old and path.is_file():
        return
    try:
        write_json(path, {"version": CACHE_VERSION, "scope": scope, "validated": dict(sorted(merged.items()))})
    except OSError as err:
        warnings.warn(f"could not write the validation cache {path} ({err}); the next start checks every "
                      "file again", stacklevel=3)


def _failure_message(item: CheckItem, err: Exception) -> str:
    if isinstance(err, MapSageError):
        return str(err)
    # Anything a decode raises would stop training when this item is drawn: report it the same way.
    return f"{item.source}: {type(err).__name__}: {err}"


def _run_checks(items: list[CheckItem], *, workers: int, progress: bool, desc: str) -> list[tuple[CheckItem, str]]:
    """Check ``items`` in a thread pool; returns the broken ones with their messages."""

    def run(item: CheckItem) -> tuple[CheckItem, str | None]:
        try:
            item.check()
        except Exception as err:  # every failure is collected and reported together
            return item, _failure_message(item, err)
        return item, None

    failed = []
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(items), desc=desc, unit="file", disable=not progress or not items) as bar:
        for item, message in pool.map(run, items):
            if message is not None:
                failed.append((item, message))
            bar.update()
    return failed


def validate_dataset(
    dataset: Validatable,
    *,
    cache_dir: str | Path | None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    workers: int | None = None,
) -> ValidationReport:
    """Decode and check every item of ``dataset`` not already validated with the same stamp.

    Rank ``r`` checks items ``r::world_size``; the ranks then exchange their results (a collective:
    every rank must call this), so every rank returns the same report. Rank 0 writes the cache,
    recording every item that passed, also when others failed: after a fix only the fixed files
    are decoded again. Broken items do not raise here: :func:`validation_error` turns the
    reports into one error.

    Args:
        dataset: The dataset (e.g. :class:`~mapsage_ds.data.loveda.LoveDA`).
        cache_dir: Where the cache files live (:func:`default_cache_dir`), or None to check
            everything and remember nothing.
        rank: This process's rank.
        world_size: Number of processes; above 1, ``torch.distributed`` must be initialised.
        progress: Show a progress bar of the items this rank decodes.
        workers: Decoding threads (default: up to 8, one per CPU core).

    Returns:
        The report of all ranks.

    Raises:
        TypeError: If ``dataset`` cannot list its items.
    """
    if not isinstance(dataset, Validatable):
        raise TypeError(f"{type(dataset).__name__} cannot be validated: it has no check_items()/validation_scope()")
    scope = dataset.validation_scope()
    items = dataset.check_items()
    cache_file = None if cache_dir is None else cache_file_for(scope, cache_dir)
    cached = {} if cache_file is None else _read_cache(cache_file, scope)

    # Every rank shards the full list, not the uncached part: ranks on other nodes may see other caches.
    mine = items[rank::world_size]
    todo = [item for item in mine if cached.get(item.key) != item.stamp]
    workers = workers or min(_DEFAULT_WORKERS, os.cpu_count() or 1)
    failed = _run_checks(todo, workers=workers, progress=progress, desc=f"checking {scope}")
    # Only the broken items travel: every other item of every share passed (decoded now or cached).
    local = ([item.key for item, _ in failed], [message for _, message in failed], len(todo))
    if world_size > 1:
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    broken = {key for share in gathered for key in share[0]}
    failures = tuple(sorted(message for share in gathered for message in share[1]))
    decoded = sum(share[2] for share in gathered)

    if cache_file is not None and rank == 0:
        passed = {item.key: item.stamp for item in items if item.key not in broken}
        _write_cache(cache_file, scope, cached, {item.key for item in items}, passed)
    return ValidationReport(scope=scope, checked=len(items), decoded=decoded, failures=failures,
                            cache_file=cache_file)


def validation_error(reports: Sequence[ValidationReport]) -> DataError | None:
    """One ``DataError`` listing the broken items of all ``reports`` (the first 20), or None if all passed."""
    failures = [message for report in reports for message in report.failures]
    if not failures:
        return None
    scopes = ", ".join(report.scope for report in reports if report.failures)
    listed = "\n  ".join(failures[:MAX_LISTED_FAILURES])
    more = (f"\n  ... and {len(failures) - MAX_LISTED_FAILURES} more"
            if len(failures) > MAX_LISTED_FAILURES else "")
    return DataError(
        f"{len(failures)} broken file(s) in {scopes}, found before training started:\n  {listed}{more}\n"
        "Fix or remove them and start again: only what changed is checked again"
    )

