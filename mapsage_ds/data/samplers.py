"""Training samplers beyond the uniform shuffle: class-aware repeat factors and per-batch crop sizes.

Both keep the interface of :class:`~mapsage_ds.data.loaders.TrainSampler` (``set_position``,
``batches_per_epoch``, ``batch_size``, ``seed``), so :class:`~mapsage_ds.data.loaders.TrainStream`
resumes them at their exact position, and both give every rank the same number of batches per
epoch (ZeRO-3 ranks must run the same number of forward passes).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mapsage_ds.data.loaders import sample_seed
from mapsage_ds.errors import ConfigError

# data.sampler: every batch drawn uniformly, or images with rare classes repeated (repeat-factor sampling).
SAMPLERS = ("uniform", "class_aware")


def _presence(sample: dict, num_classes: int) -> torch.Tensor:
    mask = sample["mask"]
    counts = torch.bincount(mask[mask < num_classes].flatten(), minlength=num_classes)
    return counts > 0


class _PresenceView(Dataset):
    def __init__(self, base: Dataset, num_classes: int) -> None:
        self.base, self.num_classes = base, num_classes

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> torch.Tensor:
        return _presence(self.base[index], self.num_classes)


def class_presence(dataset: Dataset, *, num_classes: int, num_workers: int = 0) -> torch.Tensor:
    """Which classes occur in each image of a dataset of ``{"mask": int64[H,W]}`` items.

    Every mask is read once (in ``num_workers`` processes); ignored pixels count for no class.

    Returns:
        A bool tensor [num_images, num_classes].
    """
    loader = DataLoader(_PresenceView(dataset, num_classes), batch_size=None, num_workers=num_workers)
    rows = list(loader)
    if not rows:
        raise ConfigError("class-aware sampling needs a non-empty training set")
    return torch.stack(rows)


def repeat_factors(presence: torch.Tensor, *, thresh: float) -> torch.Tensor:
    """Per-image repeat factors, LVIS style, from image-level class presence.

    A class occurring in a fraction ``f_c`` of the images gets ``r_c = max(1, sqrt(thresh / f_c))``;
    an image gets the largest ``r_c`` of the classes it contains (1 if it contains none), so images
    holding a rare class (LoveDA: barren, water) are drawn more often.

    Shape:
        - presence: (num_images, num_classes) bool
        - output: (num_images,) float64
    """
    frequency = presence.double().mean(dim=0)
    class_factor = torch.sqrt(thresh / frequency.clamp_min(1e-12))
    class_factor = torch.where(frequency > 0, class_factor, torch.ones_like(frequency)).clamp_min(1.0)
    per_image = torch.where(presence, class_factor.expand_as(presence), torch.zeros_like(class_factor)).amax(dim=1)
    return per_image.clamp_min(1.0)


class ClassAwareSampler(Sampler[int]):
    """Repeat-factor sampling with a fixed epoch length, sharded across ranks.

    Each epoch is ``L = floor(Σ r_i)`` draws laid out by systematic sampling, so image ``i``
    appears either ``floor(e_i)`` or ``ceil(e_i)`` times, with ``e_i = L · r_i / Σ r`` (≈ its repeat
    factor) and the long-run mean exactly ``e_i``. The draws are shuffled; rank ``k`` takes
    positions ``k, k + W, k + 2W, ...`` trimmed to an equal batch count on every rank, so the
    ranks' shards are disjoint and together cover the epoch (less the trimmed tail).

    Args:
        factors: Repeat factor of every image (>= 1), e.g. from :func:`repeat_factors`.
        rank: This process's rank.
        world_size: Number of processes.
        batch_size: Samples per batch on this rank.
        seed: Run seed; with the epoch it fixes the draws.
    """

    def __init__(self, factors: Sequence[float] | torch.Tensor, *, rank: int, world_size: int, batch_size: int,
                 seed: int) -> None:
        self.factors = torch.as_tensor(factors, dtype=torch.float64)
        if self.factors.numel() == 0 or bool((self.factors <= 0).any()):
            raise ConfigError("class-aware sampling needs a positive repeat factor for every image")
        self.rank, self.world_size, self.batch_size, self.seed = rank, world_size, batch_size, seed
        self.epoch, self.start_batch = 0, 0
        self.epoch_length = int(math.floor(float(self.factors.sum())))
        self.batches_per_epoch = self.epoch_length // (world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise ConfigError(f"an epoch of {self.epoch_length} class-aware draws cannot fill one batch of "
                              f"{batch_size} on each of {world_size} ranks")

    def expected_counts(self) -> torch.Tensor:
        """Expected appearances of every image per epoch (before trimming to whole batches)."""
        return self.factors * self.epoch_length / self.factors.sum()

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Where the next iteration starts."""
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """All draws of ``epoch`` in shuffled order (the same on every rank)."""
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, 2))
        offset = float(torch.rand((), generator=generator, dtype=torch.float64))
        cumulative = torch.cumsum(self.expected_counts(), dim=0)
        points = torch.arange(self.epoch_length, dtype=torch.float64) + offset
        draws = torch.searchsorted(cumulative, points, right=True).clamp_max(len(self.factors) - 1)
        return draws[torch.randperm(self.epoch_length, generator=generator)]

    def shard(self, epoch: int) -> torch.Tensor:
        """The draws of ``epoch`` that fall to this rank: equal length on every rank."""
        mine = self.epoch_indices(epoch)[self.rank::self.world_size]
        return mine[: self.batches_per_epoch * self.batch_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard(self.epoch)[self.start_batch * self.batch_size:].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


class BatchCropSizes(Sampler[tuple[int, int]]):
    """Multi-scale training: wraps a training sampler and gives each batch one crop size.

    Yields ``(index, crop_size)`` keys, which :class:`~mapsage_ds.data.loaders.TransformedDataset`
    passes on to the transform. The size of batch ``b`` of epoch ``e`` is drawn uniformly from
    ``crop_sizes`` with a generator seeded by ``(seed, e, b)`` only, so it survives resume and is
    the same on every rank at every step (ranks stay in step in time and memory).

    Args:
        sampler: A sampler with the ``TrainSampler`` interface.
        crop_sizes: The sizes to draw from.
    """

    def __init__(self, sampler: Sampler, crop_sizes: Sequence[int]) -> None:
        if not crop_sizes or any(int(size) <= 0 for size in crop_sizes):
            raise ConfigError(f"crop_sizes={list(crop_sizes)}: expected a non-empty list of positive sizes")
        self.sampler, self.crop_sizes = sampler, [int(size) for size in crop_sizes]

    @property
    def batch_size(self) -> int:
        """Samples per batch (of the wrapped sampler)."""
        return self.sampler.batch_size

    @property
    def batches_per_epoch(self) -> int:
        """Batches per epoch (of the wrapped sampler)."""
        return self.sampler.batches_per_epoch

    @property
    def seed(self) -> int:
        """Run seed (of the wrapped sampler)."""
        return self.sampler.seed

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Where the next iteration starts."""
        self.sampler.set_position(epoch, start_batch)

    def size_of_batch(self, epoch: int, batch: int) -> int:
        """The crop size of batch ``batch`` of ``epoch``."""
        rng = np.random.default_rng(sample_seed(self.seed, epoch, batch, 3))
        return self.crop_sizes[int(rng.integers(len(self.crop_sizes)))]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, start = self.sampler.epoch, self.sampler.start_batch
        for position, index in enumerate(self.sampler):
            yield index, self.size_of_batch(epoch, start + position // self.batch_size)

    def __len__(self) -> int:
        return len(self.sampler)
