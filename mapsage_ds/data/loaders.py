"""Sharded, resumable data loading on top of any dataset of ``{"image", "mask"}`` dicts."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def sample_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (run seed, epoch, index, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


class TransformedDataset(Dataset):
    """Applies a transform with a generator seeded by (seed, epoch, index)."""

    def __init__(self, base: Dataset, transform: Callable[[dict, torch.Generator], dict], *, seed: int) -> None:
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draw (takes effect for iterators created afterwards)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        # A multi-scale sampler (data/samplers.py BatchCropSizes) sends (index, crop_size) keys.
        index, crop_size = key if isinstance(key, tuple) else (key, None)
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
        if crop_size is None:
            return self.transform(self.base[index], generator)
        return self.transform(self.base[index], generator, crop_size=crop_size)


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


class TrainStream:
    """Endless iterator over training batches that knows (and restores) its position."""

    def __init__(self, dataset: TransformedDataset, sampler: TrainSampler, *, num_workers: int,
                 collate_fn: Callable[[list[dict]], dict] | None = None) -> None:
        self.dataset, self.sampler, self.num_workers, self.collate_fn = dataset, sampler, num_workers, collate_fn
        self.epoch, self.batch_in_epoch = 0, 0
        self._iterator: Iterator[dict] | None = None

    def state_dict(self) -> dict[str, int]:
        """Data position: epoch and batches consumed in it."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved data position."""
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self._iterator = None

    def _start_epoch(self) -> None:
        self.sampler.set_position(self.epoch, self.batch_in_epoch)
        self.dataset.set_epoch(self.epoch)
        # A private generator: creating an iterator must not draw from the global RNG, or a
        # resumed run (which creates its iterator after restoring that RNG) would diverge.
        loader = DataLoader(
            self.dataset, batch_size=self.sampler.batch_size, sampler=self.sampler, drop_last=True,
            num_workers=self.num_workers, pin_memory=False, persistent_workers=False, collate_fn=self.collate_fn,
            generator=torch.Generator().manual_seed(sample_seed(self.sampler.seed, self.epoch, 1)),
        )
        self._iterator = iter(loader)

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> dict:
        if self.batch_in_epoch >= self.sampler.batches_per_epoch:
            self.epoch, self.batch_in_epoch, self._iterator = self.epoch + 1, 0, None
        if self._iterator is None:
            self._start_epoch()
        batch = next(self._iterator)
        self.batch_in_epoch += 1
        return batch


def eval_shard(num_samples: int, *, rank: int, world_size: int) -> list[int]:
    """Indices of this rank's evaluation shard: every sample exactly once across ranks."""
    return list(range(rank, num_samples, world_size))


def eval_batches_per_rank(num_samples: int, *, world_size: int, batch_size: int) -> int:
    """Forward passes every rank runs, so that ranks with a shorter shard stay in step."""
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)
