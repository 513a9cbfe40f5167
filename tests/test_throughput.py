"""Honest throughput: images per second over the whole logging window, data wait included."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from mapsage_ds.data.classes import LOVEDA_CLASSES
from mapsage_ds.data.loaders import TrainSampler, TrainStream, TransformedDataset
from mapsage_ds.evaluation.metrics import ConfusionMatrix
from mapsage_ds.models.segformer import build_segformer
from mapsage_ds.optim import LRSchedule
from mapsage_ds.runtime.engine import build_optimizer, fill_ds_config, initialize_engine, read_ds_config
from mapsage_ds.tasks import SegmentationTask
from mapsage_ds.training.run_log import RunLogger
from mapsage_ds.training.throughput import ThroughputWindow
from mapsage_ds.training.trainer import Trainer

SLEEP_S = 0.04  # per sample: the loader, not the step, sets the pace


class SlowTiles(Dataset):
    """Random 32×32 tiles that take SLEEP_S each to 'load'."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> dict:
        time.sleep(SLEEP_S)
        generator = torch.Generator().manual_seed(index)
        return {"image": torch.rand(3, 32, 32, generator=generator),
                "mask": torch.randint(0, len(LOVEDA_CLASSES), (32, 32), generator=generator)}


def test_window_figures_match_an_independent_computation():
    window = ThroughputWindow(images_per_step=8)
    steps, waits = [0.30, 0.10, 0.12, 0.50, 0.11], [0.20, 0.01, 0.02, 0.40, 0.01]
    for seconds, wait in zip(steps, waits, strict=True):
        window.add_step(seconds, data_seconds=wait)
    figures = window.summary(extra_seconds=0.05)
    wall = sum(steps) + 0.05
    assert figures["images_per_s"] == pytest.approx(5 * 8 / wall)
    assert figures["data_wait_share"] == pytest.approx(sum(waits) / wall)
    timed = [*steps[:-1], steps[-1] + 0.05]
    assert figures["step_s_p50"] == pytest.approx(np.percentile(timed, 50))
    assert figures["step_s_p90"] == pytest.approx(np.percentile(timed, 90))
    with pytest.raises(ValueError, match="no step"):
        window.summary()  # each summary starts a fresh window


def test_logged_throughput_is_images_over_the_window_wall_time(tmp_path, one_process_world):
    ctx = one_process_world
    torch.manual_seed(0)
    task = SegmentationTask(build_segformer("test", list(LOVEDA_CLASSES)))
    ds_config = fill_ds_config(read_ds_config("zero2_fp32"), micro_batch_size=2, grad_accum_steps=1,
                               world_size=1, grad_clip=1.0)
    engine = initialize_engine(task, build_optimizer([{"params": list(task.parameters()), "weight_decay": 0.0}],
                                                     lr=1e-3, betas=(0.9, 0.999), eps=1e-8), ds_config)
    stream = TrainStream(TransformedDataset(SlowTiles(), lambda sample, generator: sample, seed=0),
                         TrainSampler(64, rank=0, world_size=1, batch_size=2, seed=0), num_workers=0)

    def evaluate():
        matrix = ConfusionMatrix(len(LOVEDA_CLASSES), device=torch.device("cpu"))
        return matrix.compute()

    logger = RunLogger(tmp_path, enabled=True, total_steps=12)
    trainer = Trainer(engine=engine, schedule=LRSchedule(base_lr=1e-3, total_steps=12), stream=stream,
                      evaluate=evaluate, on_new_best=lambda step, metrics: None, ctx=ctx,
                      checkpoint_dir=tmp_path / "checkpoints", logger=logger, max_steps=12, grad_accum_steps=1,
                      eval_every=100, save_every=100, log_every=4, keep_checkpoints=1, client_config={},
                      run_id="test")
    trainer.fit()
    logger.close()
    engine.destroy()

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row["kind"] == "train"]
    assert [row["step"] for row in train] == [4, 8, 12]
    # Nothing but the 4 steps of a window runs between two consecutive rows (no evaluation, no save).
    for previous, row in zip(train[:1], train[1:2], strict=True):
        wall = row["time"] - previous["time"]
        assert row["images_per_s"] == pytest.approx(4 * 2 / wall, rel=0.05)
        # At least 2 samples × SLEEP_S per step waited for the loader, and little more than that.
        slept = 4 * 2 * SLEEP_S / wall
        assert slept * 0.98 <= row["data_wait_share"] <= slept * 1.5
        assert 0 < row["step_s_p50"] <= row["step_s_p90"] < wall
