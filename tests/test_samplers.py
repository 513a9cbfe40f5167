"""Class-aware repeat-factor sampling and per-batch crop sizes: frequencies, rank shards, resume."""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest
import torch
from data_helpers import read_png

from mapsage_ds.data.loaders import TrainSampler, TrainStream, TransformedDataset
from mapsage_ds.data.loveda import LoveDA
from mapsage_ds.data.mixing import MixCollate
from mapsage_ds.data.samplers import BatchCropSizes, ClassAwareSampler, class_presence, repeat_factors
from mapsage_ds.data.transforms import TrainTransform


def test_repeat_factors_known_answer():
    # class 0 in all 4 images, class 1 in one, class 2 in two, class 3 nowhere.
    presence = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    factors = repeat_factors(presence, thresh=0.5)
    # r_1 = sqrt(0.5 / 0.25) = sqrt(2), r_2 = sqrt(0.5 / 0.5) = 1, r_0 = max(1, sqrt(0.5)) = 1.
    torch.testing.assert_close(factors, torch.tensor([math.sqrt(2), 1.0, 1.0, 1.0], dtype=torch.float64))


def test_class_presence_reads_the_masks(tiny_tree):
    dataset = LoveDA(tiny_tree, "Train")
    presence = class_presence(dataset, num_classes=7)
    for i, sample in enumerate(dataset.samples):
        raw = read_png(sample.mask)
        expected = [bool(((raw == c + 1)).any()) for c in range(7)]
        assert presence[i].tolist() == expected


def generated_factors(n: int = 40, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    presence = torch.from_numpy(rng.random((n, 7)) < np.array([0.9, 0.6, 0.5, 0.15, 0.08, 0.4, 0.7]))
    return repeat_factors(presence, thresh=0.5)


def test_frequencies_match_the_repeat_factors():
    factors = generated_factors()
    assert factors.max() > 2.0  # the rare classes are really repeated
    sampler = ClassAwareSampler(factors, rank=0, world_size=1, batch_size=4, seed=3)
    expected = sampler.expected_counts()
    torch.testing.assert_close(expected / factors, torch.full_like(factors, expected[0] / factors[0]))
    epochs = 200
    total = torch.zeros_like(factors)
    for epoch in range(epochs):
        counts = torch.bincount(sampler.epoch_indices(epoch), minlength=len(factors)).double()
        assert len(sampler.epoch_indices(epoch)) == sampler.epoch_length
        # Systematic sampling: every image appears floor(e_i) or ceil(e_i) times in every epoch.
        assert ((counts >= expected.floor()) & (counts <= expected.ceil())).all()
        total += counts
    torch.testing.assert_close(total / epochs, expected, atol=0.1, rtol=0)


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shards_are_disjoint_and_cover_the_epoch(world_size):
    factors = generated_factors(n=37)
    samplers = [ClassAwareSampler(factors, rank=r, world_size=world_size, batch_size=2, seed=1)
                for r in range(world_size)]
    per_rank = {len(list(s)) for s in samplers}
    assert per_rank == {samplers[0].batches_per_epoch * 2}
    epoch = samplers[0].epoch_indices(0)
    used = world_size * samplers[0].batches_per_epoch * 2
    assert sampler_union(samplers) == collections.Counter(epoch[:used].tolist())
    assert sampler_positions(samplers) == list(range(used))


def sampler_union(samplers) -> collections.Counter:
    return collections.Counter(i for s in samplers for i in s)


def sampler_positions(samplers) -> list[int]:
    """Epoch positions each rank takes (rank r: r, r + W, ...), flattened and sorted."""
    world = len(samplers)
    n = len(samplers[0].shard(0))
    return sorted(r + k * world for r in range(world) for k in range(n))


def test_resume_position_and_batch_crop_sizes():
    base = ClassAwareSampler(generated_factors(), rank=1, world_size=2, batch_size=3, seed=0)
    sizes = BatchCropSizes(base, [32, 48, 64])
    sizes.set_position(epoch=2, start_batch=0)
    full = list(sizes)
    batches = [full[i:i + 3] for i in range(0, len(full), 3)]
    assert all(len({size for _, size in batch}) == 1 for batch in batches)
    assert len({batch[0][1] for batch in batches}) == 3
    sizes.set_position(epoch=2, start_batch=4)
    assert list(sizes) == full[12:]
    other_rank = BatchCropSizes(ClassAwareSampler(generated_factors(), rank=0, world_size=2, batch_size=3, seed=0),
                                [32, 48, 64])
    other_rank.set_position(epoch=2)
    assert [s for _, s in other_rank][::3] == [batch[0][1] for batch in batches]


def test_full_recipe_stream_resumes_bit_exactly(tiny_tree):
    dataset = LoveDA(tiny_tree, "Train")
    factors = repeat_factors(class_presence(dataset, num_classes=7), thresh=0.5)

    def stream() -> TrainStream:
        transform = TrainTransform(crop_size=32, vflip=True, rot90=True, rotate_degrees=15.0,
                                   scale_range=(0.75, 1.5))
        sampler = BatchCropSizes(ClassAwareSampler(factors, rank=0, world_size=1, batch_size=2, seed=4), [24, 32])
        return TrainStream(TransformedDataset(dataset, transform, seed=4), sampler, num_workers=0,
                           collate_fn=MixCollate(mixup=0.3, cutmix=0.3))

    uninterrupted = stream()
    steps = 2 * uninterrupted.sampler.batches_per_epoch + 1  # crosses two epoch boundaries
    reference = [next(uninterrupted) for _ in range(steps)]
    resumed = stream()
    resumed.load_state_dict({"epoch": 1, "batch_in_epoch": 1})
    position = uninterrupted.sampler.batches_per_epoch + 1
    for expected in reference[position:]:
        batch = next(resumed)
        assert batch.keys() == expected.keys()
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(batch[key], value), key


def test_uniform_sampler_interface_is_what_batch_crop_sizes_wraps():
    sizes = BatchCropSizes(TrainSampler(10, rank=0, world_size=1, batch_size=2, seed=0), [16])
    assert (sizes.batch_size, sizes.batches_per_epoch, sizes.seed) == (2, 5, 0)
    assert [size for _, size in sizes] == [16] * 10
