"""Sharded, resumable data loading on top of any dataset of ``{"image", "mask"}`` dicts."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mapsage_ds.errors import ConfigError

# Batches each loader worker prepares ahead: enough to ride out a slow image at an epoch boundary or a
# checkpoint pause; the cost is num_workers × this many batches held in (pinned) host memory.
DEFAULT_PREFETCH_FACTOR = 4


def sample_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (run seed, epoch, index, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


class SampleKey(NamedTuple):
    """One training draw as the loader asks the dataset for it.

    The key carries its epoch, so the sample's augmentation seed is a function of the key alone:
    a persistent loader worker, forked once, never sees the main process's later state.

    Attributes:
        epoch: Epoch of the draw.
        index: Image index in the base dataset.
        crop_size: The batch's crop size (multi-scale training), or None for the transform's own.
    """

    epoch: int
    index: int
    crop_size: int | None = None


class TransformedDataset(Dataset):
    """Applies a transform with a generator seeded by (seed, epoch, index).

    Keys: a :class:`SampleKey` (what :class:`TrainStream` sends; it carries its epoch), or a plain
    index or ``(index, crop_size)`` pair, which take the epoch of :meth:`set_epoch`.
    """

    def __init__(self, base: Dataset, transform: Callable[[dict, torch.Generator], dict], *, seed: int) -> None:
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch of keys that carry none (plain indices and ``(index, crop_size)`` pairs)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int] | SampleKey) -> dict:
        if not isinstance(key, SampleKey):
            # A multi-scale sampler (data/samplers.py BatchCropSizes) sends (index, crop_size) keys.
            index, crop_size = key if isinstance(key, tuple) else (key, None)
            key = SampleKey(self.epoch, int(index), crop_size)
        generator = torch.Generator().manual_seed(sample_seed(self.seed, key.epoch, key.index))
        if key.crop_size is None:
            return self.transform(self.base[key.index], generator)
        return self.transform(self.base[key.index], generator, crop_size=key.crop_size)


class TrainSampler(Sampler[int]):
    """Per-epoch shuffled shard of this rank, trimmed so every rank runs the same batch count.

    Equal counts keep ZeRO-3 ranks in step. ``start_batch`` skips batches already consumed,
    which is how a resumed run continues from its exact data position.
    """

    def __init__(self, num_samples: int, *, rank: int, world_size: int, batch_size: int, seed: int) -> None:
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.batch_size, self.seed = batch_size, seed
        self.epoch, self.start_batch = 0, 0
        self.batches_per_epoch = num_samples // (world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{num_samples} training samples cannot fill one batch of {batch_size} on each of {world_size} ranks"
            )

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Where the next iteration starts."""
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch))
        order = torch.randperm(self.num_samples, generator=generator)
        mine = order[self.rank::self.world_size][: self.batches_per_epoch * self.batch_size]
        return iter(mine[self.start_batch * self.batch_size:].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


class EndlessBatches(Sampler[list[SampleKey]]):
    """Batch sampler without end: this rank's batches of every epoch from a start position on.

    Wraps a per-epoch sampler (``TrainSampler``, ``ClassAwareSampler``, ``BatchCropSizes``: they
    yield indices or ``(index, crop_size)`` pairs) and moves it from epoch to epoch itself, so one
    DataLoader iterator serves the whole run. A DataLoader asks its batch sampler for keys in the
    main process, which may run ahead of training by the prefetched batches; the workers only see
    the :class:`SampleKey` lists.

    Args:
        sampler: A sampler with the ``TrainSampler`` interface (``set_position``, ``batch_size``).
    """

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.start_epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Where the next iteration starts."""
        self.start_epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[list[SampleKey]]:
        epoch, start, size = self.start_epoch, self.start_batch, self.sampler.batch_size
        while True:
            self.sampler.set_position(epoch, start)
            batch: list[SampleKey] = []
            for item in self.sampler:
                index, crop_size = item if isinstance(item, tuple) else (item, None)
                batch.append(SampleKey(epoch, int(index), crop_size))
                if len(batch) == size:
                    yield batch
                    batch = []
            epoch, start = epoch + 1, 0


class TrainStream:
    """Endless iterator over training batches that knows (and restores) its position.

    One DataLoader serves the whole run: its batch sampler (:class:`EndlessBatches`) runs on across
    epochs, so the ``num_workers`` loader processes are forked once and keep prefetching through
    epoch boundaries. Every sample's augmentation is a function of its :class:`SampleKey`, and
    batch mixing (:class:`~mapsage_ds.data.mixing.MixCollate`) a function of the batch's samples,
    so the batches are the same whatever the number of workers, and a stream restored from
    :meth:`state_dict` continues exactly as the uninterrupted one.

    Args:
        dataset: The training dataset.
        sampler: A per-epoch sampler with the ``TrainSampler`` interface.
        num_workers: Loader processes (0: load in this process).
        collate_fn: Batch collation (default: ``default_collate``).
        pin_memory: Return batches in page-locked memory, for asynchronous copies to an accelerator
            (leave it off for CPU training: pinning would only cost time).
        prefetch_factor: Batches each worker prepares ahead (ignored without workers).

    Raises:
        ConfigError: If ``num_workers`` is negative or ``prefetch_factor`` is below 1.
    """

    def __init__(self, dataset: TransformedDataset, sampler: TrainSampler, *, num_workers: int,
                 collate_fn: Callable[[list[dict]], dict] | None = None, pin_memory: bool = False,
                 prefetch_factor: int = DEFAULT_PREFETCH_FACTOR) -> None:
        if num_workers < 0:
            raise ConfigError(f"num_workers={num_workers}: expected 0 (load in the training process) or more")
        if prefetch_factor < 1:
            raise ConfigError(f"prefetch_factor={prefetch_factor}: expected at least 1 batch per worker")
        self.dataset, self.sampler, self.num_workers, self.collate_fn = dataset, sampler, num_workers, collate_fn
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.epoch, self.batch_in_epoch = 0, 0
        self._batches = EndlessBatches(sampler)
        self._loader: DataLoader | None = None
        self._iterator: Iterator[dict] | None = None

    def state_dict(self) -> dict[str, int]:
        """Data position: epoch and batches consumed in it."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved data position (batches already prefetched are dropped; workers stay)."""
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self._iterator = None

    def _iterate_from_position(self) -> Iterator[dict]:
        self._batches.set_position(self.epoch, self.batch_in_epoch)
        if self._loader is None:
            workers = self.num_workers > 0
            # A private generator: creating an iterator must not draw from the global RNG, or a
            # resumed run (which creates its iterator after restoring that RNG) would diverge.
            self._loader = DataLoader(
                self.dataset, batch_sampler=self._batches, num_workers=self.num_workers, collate_fn=self.collate_fn,
                pin_memory=self.pin_memory, persistent_workers=workers,
                prefetch_factor=self.prefetch_factor if workers else None,
                generator=torch.Generator().manual_seed(self.sampler.seed),
            )
        # With persistent workers a second iter() restarts the batch sampler in the same processes.
        return iter(self._loader)

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> dict:
        if self.batch_in_epoch >= self.sampler.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        if self._iterator is None:
            self._iterator = self._iterate_from_position()
        batch = next(self._iterator)
        self.batch_in_epoch += 1
        return batch


def eval_shard(num_samples: int, *, rank: int, world_size: int) -> list[int]:
    """Indices of this rank's evaluation shard: every sample exactly once across ranks."""
    return list(range(rank, num_samples, world_size))


def eval_batches_per_rank(num_samples: int, *, world_size: int, batch_size: int) -> int:
    """Forward passes every rank runs, so that ranks with a shorter shard stay in step."""
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)
