"""The training data stream: loader workers kept for the whole run, batches independent of them, exact resume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mapsage_ds.builders import build_train_stream, build_train_transform
from mapsage_ds.config import AugmentConfig, DataConfig
from mapsage_ds.data.classes import NUM_CLASSES
from mapsage_ds.data.loaders import SampleKey, TrainSampler, TrainStream, TransformedDataset
from mapsage_ds.data.loveda import LoveDA
from mapsage_ds.data.transforms import Normalize, TrainTransform
from mapsage_ds.errors import ConfigError
from mapsage_ds.runtime.accelerator import DistributedContext

CPU_WORLD_OF_ONE = DistributedContext(device=torch.device("cpu"), backend="gloo", rank=0, local_rank=0, world_size=1)


class WorkerPidDataset(TransformedDataset):
    """A training dataset whose samples also say which process loaded them."""

    def __getitem__(self, key: int | tuple[int, int] | SampleKey) -> dict:
        return {**super().__getitem__(key), "pid": torch.tensor(os.getpid())}


def full_recipe_stream(tree: Path, *, num_workers: int) -> TrainStream:
    """Class-aware draws, one crop size per batch, every augmentation, CutMix and MixUp: built as a run builds it."""
    augment = AugmentConfig(crop_sizes=[24, 32], scale_range=[0.75, 1.5], vflip=True, rot90=True, rotate_degrees=15.0,
                            mixup=0.4, cutmix=0.4)
    data = DataConfig(root=str(tree), crop_size=32, num_workers=num_workers, augment=augment, sampler="class_aware")
    transform = build_train_transform(data, Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    dataset = TransformedDataset(LoveDA(tree, "Train"), transform, seed=4)
    return build_train_stream(data, dataset, CPU_WORLD_OF_ONE, batch_size=2, seed=4, num_classes=NUM_CLASSES)


def assert_same_batches(actual: list[dict], expected: list[dict]) -> None:
    assert len(actual) == len(expected)
    for position, (batch, reference) in enumerate(zip(actual, expected)):
        assert batch.keys() == reference.keys(), position
        for key, value in reference.items():
            same = torch.equal(batch[key], value) if isinstance(value, torch.Tensor) else batch[key] == value
            assert same, (position, key)


def test_workers_change_nothing_and_a_restored_stream_continues_bit_exactly(tiny_tree):
    in_process = full_recipe_stream(tiny_tree, num_workers=0)
    per_epoch = in_process.sampler.batches_per_epoch
    reference = [next(in_process) for _ in range(3 * per_epoch)]
    assert in_process.state_dict() == {"epoch": 2, "batch_in_epoch": per_epoch}
    assert any("mask_mix" in batch for batch in reference)  # MixUp batches are among them
    assert len({batch["image"].shape[-1] for batch in reference}) == 2  # and both crop sizes
    assert in_process.pin_memory is False  # CPU training: nothing to pin for
    # Each epoch draws its own augmentation of an image (the key carries the epoch; nothing calls set_epoch).
    draws = {(position // per_epoch, name, int(seed)) for position, batch in enumerate(reference)
             for name, seed in zip(batch["name"], batch["seed"])}
    assert len({seed for _, _, seed in draws}) == len({(epoch, name) for epoch, name, _ in draws})
    assert len({(epoch, name) for epoch, name, _ in draws}) > len({name for _, name, _ in draws})

    with_workers = full_recipe_stream(tiny_tree, num_workers=2)
    assert_same_batches([next(with_workers) for _ in range(3 * per_epoch)], reference)

    # A resumed run: a new stream (new workers) from a saved mid-epoch-2 position.
    middle = per_epoch + per_epoch // 2
    resumed = full_recipe_stream(tiny_tree, num_workers=2)
    resumed.load_state_dict({"epoch": 1, "batch_in_epoch": per_epoch // 2})
    assert_same_batches([next(resumed) for _ in range(3 * per_epoch - middle)], reference[middle:])

    # The teacher cache's replay: the same stream moved back, its prefetched batches dropped.
    with_workers.load_state_dict({"epoch": 0, "batch_in_epoch": 1})
    assert_same_batches([next(with_workers) for _ in range(per_epoch)], reference[1:per_epoch + 1])
    assert with_workers.state_dict() == {"epoch": 1, "batch_in_epoch": 1}


def test_workers_are_forked_once_for_the_whole_run(tiny_tree):
    dataset = WorkerPidDataset(LoveDA(tiny_tree, "Train"), TrainTransform(crop_size=32), seed=0)
    sampler = TrainSampler(len(dataset), rank=0, world_size=1, batch_size=1, seed=0)
    stream = TrainStream(dataset, sampler, num_workers=2, prefetch_factor=2)
    epochs = 3
    pids = [set() for _ in range(epochs + 1)]
    for _ in range(epochs * sampler.batches_per_epoch):
        batch = next(stream)
        pids[stream.epoch].update(batch["pid"].tolist())
    stream.load_state_dict({"epoch": 0, "batch_in_epoch": 0})  # a restart of the iterator keeps them too
    for _ in range(sampler.batches_per_epoch):
        pids[epochs].update(next(stream)["pid"].tolist())
    assert len(pids[0]) == 2 and os.getpid() not in pids[0]
    assert all(seen == pids[0] for seen in pids), pids


def test_bad_loader_settings_are_config_errors(tiny_tree):
    dataset = TransformedDataset(LoveDA(tiny_tree, "Train"), TrainTransform(crop_size=32), seed=0)
    sampler = TrainSampler(len(dataset), rank=0, world_size=1, batch_size=2, seed=0)
    with pytest.raises(ConfigError, match="num_workers=-1"):
        TrainStream(dataset, sampler, num_workers=-1)
    with pytest.raises(ConfigError, match="prefetch_factor=0"):
        TrainStream(dataset, sampler, num_workers=2, prefetch_factor=0)
