"""Boundary IoU (Cheng et al., 2021) against its definition: hand-built cases and a brute-force reference."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from mapsage_ds.errors import ConfigError, DataError
from mapsage_ds.evaluation.metrics import (
    BoundaryIoU,
    ConfusionMatrix,
    SegmentationMetrics,
    boundary_band,
    boundary_width_for,
)

IGNORE = 255


def brute_force_band(mask: np.ndarray, d: int) -> np.ndarray:
    """Pixels of ``mask`` with a pixel outside it (or outside the image) within chessboard distance ``d``."""
    height, width = mask.shape
    band = np.zeros_like(mask)
    for y in range(height):
        for x in range(width):
            if not mask[y, x]:
                continue
            for dy in range(-d, d + 1):
                for dx in range(-d, d + 1):
                    yy, xx = y + dy, x + dx
                    outside = not (0 <= yy < height and 0 <= xx < width) or not mask[yy, xx]
                    if outside:
                        band[y, x] = True
    return band


def brute_force_boundary_iou(preds, targets, num_classes: int, d: int) -> list[float]:
    inter, union = np.zeros(num_classes), np.zeros(num_classes)
    for pred, target in zip(preds, targets):
        valid = target != IGNORE
        for c in range(num_classes):
            gt = brute_force_band((target == c) & valid, d)
            pr = brute_force_band((pred == c) & valid, d)
            inter[c] += np.sum(gt & pr)
            union[c] += np.sum(gt | pr)
    return [i / u if u else math.nan for i, u in zip(inter, union)]


def test_band_of_a_square_by_hand():
    mask = torch.zeros(1, 9, 9, dtype=torch.bool)
    mask[0, 2:7, 2:7] = True  # a 5x5 square
    ring = mask.clone()
    ring[0, 3:6, 3:6] = False
    assert torch.equal(boundary_band(mask, 1), ring)
    thick = mask.clone()
    thick[0, 4, 4] = False  # only the centre is farther than 2 from the outside
    assert torch.equal(boundary_band(mask, 2), thick)
    assert torch.equal(boundary_band(mask, 3), mask)  # every pixel is within 3 of the edge


def test_image_frame_is_a_contour():
    full = torch.ones(1, 6, 7, dtype=torch.bool)
    band = boundary_band(full, 1)
    expected = torch.ones(6, 7, dtype=torch.bool)
    expected[1:-1, 1:-1] = False
    assert torch.equal(band[0], expected)


def test_half_split_known_answer():
    # GT: class 1 on columns 0..3, class 0 on 4..7; prediction moves the edge one column right.
    target = torch.zeros(1, 8, 8, dtype=torch.int64)
    target[..., :4] = 1
    pred = torch.zeros(1, 8, 8, dtype=torch.int64)
    pred[..., :5] = 1
    metric = BoundaryIoU(2, width=1)
    metric.update(pred, target)
    per_class, mean = metric.compute()
    # class 1: GT band 20 px, predicted band 22 px, 14 shared -> 14 / 28; class 0 by the same count.
    assert per_class[1] == pytest.approx(14 / 28)
    assert per_class[0] == pytest.approx(brute_force_boundary_iou([pred[0].numpy()], [target[0].numpy()], 2, 1)[0])
    assert mean == pytest.approx(np.mean(per_class))


def test_perfect_and_disjoint_predictions():
    target = torch.zeros(1, 12, 12, dtype=torch.int64)
    target[0, 3:9, 2:10] = 2
    metric = BoundaryIoU(3, width=2)
    metric.update(target.clone(), target)
    per_class, _ = metric.compute()
    assert per_class[0] == 1.0 and per_class[2] == 1.0
    assert math.isnan(per_class[1])  # absent from both: no boundary to score
    metric.reset()
    metric.update(torch.ones_like(target), target)
    per_class, _ = metric.compute()
    assert per_class == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("d", [1, 2, 4])
def test_matches_brute_force_definition_on_random_maps(d):
    generator = torch.Generator().manual_seed(d)
    # Blocky maps (upsampled noise) so classes form regions with real contours.
    coarse_t = torch.randint(0, 4, (3, 5, 6), generator=generator)
    target = coarse_t.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, :19, :22]
    pred = target.clone()
    flip = torch.rand(target.shape, generator=generator) < 0.15
    pred[flip] = torch.randint(0, 4, (int(flip.sum()),), generator=generator)
    target[torch.rand(target.shape, generator=generator) < 0.1] = IGNORE
    metric = BoundaryIoU(4, ignore_index=IGNORE, width=d)
    metric.update(pred[:2], target[:2])
    metric.update(pred[2:], target[2:])
    expected = brute_force_boundary_iou(list(pred.numpy()), list(target.numpy()), 4, d)
    assert metric.compute()[0] == pytest.approx(expected, nan_ok=True)
    for mask in (target == 1, pred == 3):
        assert np.array_equal(boundary_band(mask, d).numpy(), np.stack([brute_force_band(m, d) for m in mask.numpy()]))


def test_ignored_pixels_never_count_and_never_penalise():
    target = torch.zeros(1, 16, 16, dtype=torch.int64)
    target[0, :, 8:] = 1
    target[0, :, 12:] = IGNORE  # no-data strip beside class 1
    pred = target.clone()
    pred[0, :, 12:] = 1  # the model paints class 1 into the no-data strip
    metric = BoundaryIoU(2, ignore_index=IGNORE, width=2)
    metric.update(pred, target)
    assert metric.compute()[0] == [1.0, 1.0]
    # Whatever is predicted at ignored pixels, nothing changes.
    other = pred.clone()
    other[0, :, 12:] = 0
    again = BoundaryIoU(2, ignore_index=IGNORE, width=2)
    again.update(other, target)
    assert again.compute()[0] == [1.0, 1.0]


def test_width_from_the_dilation_ratio():
    assert boundary_width_for(1024, 1024, dilation_ratio=0.02) == 29
    assert boundary_width_for(10, 10, dilation_ratio=0.02) == 1
    metric = BoundaryIoU(2, dilation_ratio=0.05)
    assert metric.band_width(100, 100) == 7
    assert BoundaryIoU(2, width=3).band_width(100, 100) == 3


def test_bad_arguments_are_errors():
    with pytest.raises(ConfigError):
        BoundaryIoU(2, width=0)
    with pytest.raises(ConfigError):
        BoundaryIoU(2, dilation_ratio=1.5)
    with pytest.raises(ConfigError):
        boundary_band(torch.ones(1, 4, 4, dtype=torch.bool), 0)
    with pytest.raises(DataError):
        BoundaryIoU(2).update(torch.zeros(1, 4, 4, dtype=torch.int64), torch.zeros(1, 4, 5, dtype=torch.int64))


def test_metrics_carry_boundary_iou_through_dict_and_table():
    matrix = ConfusionMatrix(2, class_names=["a", "b"])
    matrix.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    metrics = dataclasses.replace(matrix.compute(), boundary_iou=[0.5, math.nan], mean_boundary_iou=0.5)
    assert SegmentationMetrics(**metrics.to_dict()).boundary_iou[0] == 0.5
    lines = metrics.format_table().splitlines()
    assert "BIoU %" in lines[0]
    assert lines[2].split()[-1] == "50.00" and lines[3].split()[-1] == "n/a"
    assert lines[-1].split()[-1] == "50.00" and lines[-1].startswith("mean BIoU")
