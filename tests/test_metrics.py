"""Tests for mapsage_ds.evaluation.metrics: known answers, a NumPy reference, invariances, 2-rank all-reduce."""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mapsage_ds.errors import ConfigError, DataError
from mapsage_ds.evaluation.metrics import ConfusionMatrix, SegmentationMetrics
from mapsage_ds.runtime.network import free_port

IGNORE = 255


def _random_batch(
    seed: int, num_classes: int = 7, shape: tuple[int, ...] = (4, 32, 32), ignore_fraction: float = 0.15
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, shape, generator=generator)
    pred = torch.randint(0, num_classes, shape, generator=generator)
    # Bias predictions towards the truth so scores are not all near 1/C.
    agree = torch.rand(shape, generator=generator) < 0.5
    pred = torch.where(agree, target, pred)
    ignored = torch.rand(shape, generator=generator) < ignore_fraction
    target = torch.where(ignored, torch.full_like(target, IGNORE), target)
    return pred, target


def _numpy_reference(pred: np.ndarray, target: np.ndarray, num_classes: int) -> dict:
    """Independent computation: np.add.at for the matrix, per-class boolean masks for scores."""
    valid = target != IGNORE
    p, t = pred[valid], target[valid]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (t, p), 1)

    iou, f1 = [], []
    for c in range(num_classes):
        in_gt, in_pred = t == c, p == c
        tp = np.sum(in_gt & in_pred)
        fp = np.sum(~in_gt & in_pred)
        fn = np.sum(in_gt & ~in_pred)
        union = tp + fp + fn
        iou.append(tp / union if union else math.nan)
        f1.append(2 * tp / (2 * tp + fp + fn) if union else math.nan)
    return {
        "confusion": confusion,
        "iou": np.array(iou),
        "f1": np.array(f1),
        "miou": np.nanmean(iou),
        "mean_f1": np.nanmean(f1),
        "overall_accuracy": np.mean(p == t),
    }


def _assert_matches_reference(metrics: SegmentationMetrics, ref: dict) -> None:
    np.testing.assert_array_equal(np.array(metrics.confusion), ref["confusion"])
    np.testing.assert_allclose(metrics.iou, ref["iou"], rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(metrics.f1, ref["f1"], rtol=1e-12, equal_nan=True)
    assert metrics.miou == pytest.approx(ref["miou"], rel=1e-12)
    assert metrics.mean_f1 == pytest.approx(ref["mean_f1"], rel=1e-12)
    assert metrics.overall_accuracy == pytest.approx(ref["overall_accuracy"], rel=1e-12)


def _metrics_for(pred: torch.Tensor, target: torch.Tensor, num_classes: int = 7) -> SegmentationMetrics:
    matrix = ConfusionMatrix(num_classes)
    matrix.update(pred, target)
    return matrix.compute()


# --- known answers ---------------------------------------------------------------------------


def test_hand_built_known_answer():
    # Non-ignored (gt, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,0); the (255, 2) pixel is dropped.
    # Confusion rows=gt: [[1,1,0],[0,2,0],[1,0,0]].
    # class 0: TP=1 FP=1 FN=1 -> IoU 1/3, F1 2/4;  class 1: TP=2 FP=1 FN=0 -> IoU 2/3, F1 4/5;
    # class 2: TP=0 FP=0 FN=1 -> IoU 0, F1 0.  mIoU = 1/3, mean F1 = 1.3/3, OA = 3/5.
    target = torch.tensor([0, 0, 1, 1, IGNORE, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0])
    metrics = _metrics_for(pred, target, num_classes=3)

    assert metrics.confusion == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert metrics.iou == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert metrics.f1 == pytest.approx([0.5, 0.8, 0.0])
    assert metrics.miou == pytest.approx(1 / 3)
    assert metrics.mean_f1 == pytest.approx(1.3 / 3)
    assert metrics.overall_accuracy == pytest.approx(3 / 5)


def test_perfect_prediction_scores_one():
    _, target = _random_batch(seed=1)
    pred = torch.where(target == IGNORE, torch.zeros_like(target), target)
    metrics = _metrics_for(pred, target)
    assert metrics.miou == 1.0
    assert metrics.mean_f1 == 1.0
    assert metrics.overall_accuracy == 1.0
    assert metrics.iou == [1.0] * 7


def test_class_absent_from_truth_and_prediction_is_nan_and_excluded_from_means():
    # Classes 0 and 1 each: TP=1 and one error -> IoU 1/2, F1 2/3. Class 2 never appears -> NaN.
    # Means over the two scored classes: mIoU 1/2 (not (1/2+1/2+0)/3), mean F1 2/3.
    metrics = _metrics_for(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), num_classes=3)
    assert metrics.iou[:2] == pytest.approx([0.5, 0.5])
    assert math.isnan(metrics.iou[2]) and math.isnan(metrics.f1[2])
    assert metrics.miou == pytest.approx(0.5)
    assert metrics.mean_f1 == pytest.approx(2 / 3)


def test_class_predicted_but_absent_from_truth_scores_zero():
    # Class 0: TP=1 FN=1 -> IoU 1/2. Class 2: FP=1 only -> IoU 0 (counted). Class 1 -> NaN.
    # mIoU = (1/2 + 0) / 2 = 1/4.
    metrics = _metrics_for(torch.tensor([0, 2]), torch.tensor([0, 0]), num_classes=3)
    assert metrics.iou[0] == pytest.approx(0.5)
    assert math.isnan(metrics.iou[1])
    assert metrics.iou[2] == 0.0
    assert metrics.miou == pytest.approx(0.25)


def test_empty_matrix_gives_nan_everywhere():
    metrics = ConfusionMatrix(3).compute()
    assert all(math.isnan(v) for v in metrics.iou + metrics.f1)
    assert math.isnan(metrics.miou) and math.isnan(metrics.overall_accuracy)


# --- NumPy reference and invariances ----------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_numpy_reference(seed):
    pred, target = _random_batch(seed)
    _assert_matches_reference(_metrics_for(pred, target), _numpy_reference(pred.numpy(), target.numpy(), 7))


def test_matches_numpy_reference_with_missing_classes():
    pred, target = _random_batch(seed=3, num_classes=4)  # classes 4..6 never occur
    metrics = _metrics_for(pred, target, num_classes=7)
    assert all(math.isnan(v) for v in metrics.iou[4:])
    _assert_matches_reference(metrics, _numpy_reference(pred.numpy(), target.numpy(), 7))


def test_miou_is_mean_over_classes_not_micro_average():
    pred, target = _random_batch(seed=4)
    metrics = _metrics_for(pred, target)
    confusion = np.array(metrics.confusion)
    tp = np.diag(confusion).sum()
    micro_jaccard = tp / (2 * confusion.sum() - tp)
    assert metrics.miou == pytest.approx(np.mean(metrics.iou))
    assert metrics.miou != pytest.approx(micro_jaccard)


def test_predictions_at_ignored_pixels_change_nothing():
    pred, target = _random_batch(seed=5)
    ignored = target == IGNORE
    # Out-of-range values are fine where the target is ignored.
    noise = torch.randint(-3, 300, pred.shape, generator=torch.Generator().manual_seed(0))
    scrambled = torch.where(ignored, noise, pred)
    assert _metrics_for(scrambled, target) == _metrics_for(pred, target)


def test_accumulating_updates_equals_one_update_over_concatenation():
    batches = [_random_batch(seed) for seed in range(3)]
    accumulated = ConfusionMatrix(7)
    for pred, target in batches:
        accumulated.update(pred, target)
    all_pred = torch.cat([p for p, _ in batches])
    all_target = torch.cat([t for _, t in batches])
    assert accumulated.compute() == _metrics_for(all_pred, all_target)


def test_reset_clears_counts():
    matrix = ConfusionMatrix(7)
    matrix.update(*_random_batch(seed=6))
    matrix.reset()
    assert int(matrix.matrix.sum()) == 0


def test_accepts_other_integer_dtypes():
    pred, target = _random_batch(seed=7)
    narrow = _metrics_for(pred.to(torch.uint8), target.to(torch.uint8))
    assert narrow == _metrics_for(pred, target)


def test_all_reduce_without_process_group_is_a_no_op():
    matrix = ConfusionMatrix(7)
    matrix.update(*_random_batch(seed=8))
    before = matrix.matrix.clone()
    matrix.all_reduce()
    assert torch.equal(matrix.matrix, before)


# --- bad input --------------------------------------------------------------------------------


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(DataError, match=r"\(2, 3\).*\(2, 4\)"):
        ConfusionMatrix(7).update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("bad", [7, 9, -1])
def test_target_out_of_range_raises_with_value(bad):
    target = torch.tensor([0, bad, 1, IGNORE])
    with pytest.raises(DataError, match=rf"target values \[{bad}\]"):
        ConfusionMatrix(7).update(torch.zeros(4, dtype=torch.long), target)


@pytest.mark.parametrize("bad", [7, -2])
def test_pred_out_of_range_at_valid_pixel_raises_with_value(bad):
    pred = torch.tensor([0, bad, 1])
    with pytest.raises(DataError, match=rf"pred values \[{bad}\]"):
        ConfusionMatrix(7).update(pred, torch.tensor([0, 1, 1]))


def test_failed_update_leaves_matrix_untouched():
    matrix = ConfusionMatrix(7)
    with pytest.raises(DataError):
        matrix.update(torch.tensor([0, 8]), torch.tensor([0, 1]))
    assert int(matrix.matrix.sum()) == 0


def test_float_input_raises():
    with pytest.raises(DataError, match="float32"):
        ConfusionMatrix(7).update(torch.zeros(3), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("num_classes", [0, -1, 2.0])
def test_bad_num_classes_raises(num_classes):
    with pytest.raises(ConfigError, match=str(num_classes)):
        ConfusionMatrix(num_classes)


def test_class_names_length_mismatch_raises():
    with pytest.raises(ConfigError, match="2 entries"):
        ConfusionMatrix(3, class_names=["a", "b"])


# --- reporting ---------------------------------------------------------------------------------


def test_class_names_pass_through_and_table_lists_every_class():
    names = ["background", "building", "road"]
    matrix = ConfusionMatrix(3, class_names=names)
    # gt pixel counts: background 2, building 2, road 0 (road never predicted either -> n/a).
    matrix.update(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 0, 1, 1]))
    metrics = matrix.compute()
    assert metrics.class_names == names

    lines = metrics.format_table().splitlines()
    class_rows = [line for line in lines if line.split()[0] in names]
    assert [row.split()[0] for row in class_rows] == names
    assert len({len(row) for row in class_rows}) == 1  # fixed width
    assert class_rows[0].split() == ["background", "50.00", "66.67", "2"]
    assert class_rows[2].split() == ["road", "n/a", "n/a", "0"]
    summary = {line.split()[0] for line in lines}
    assert {"mIoU", "mean", "OA"} <= summary


def test_table_without_names_uses_indices():
    table = _metrics_for(*_random_batch(seed=9)).format_table()
    assert "class_0" in table and "class_6" in table


def test_to_dict_round_trips():
    metrics = _metrics_for(*_random_batch(seed=10))
    assert SegmentationMetrics(**metrics.to_dict()) == metrics


# --- distributed ---------------------------------------------------------------------------------




def _all_reduce_worker(
    rank: int, world_size: int, port: int, preds: list, targets: list, out_dir: str
) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        matrix = ConfusionMatrix(7)
        matrix.update(preds[rank], targets[rank])
        matrix.all_reduce()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(matrix.compute().to_dict()))
    finally:
        dist.destroy_process_group()


def test_all_reduce_across_two_processes_equals_single_process(tmp_path):
    pred, target = _random_batch(seed=11, shape=(6, 24, 24))
    preds, targets = list(pred.chunk(2)), list(target.chunk(2))
    mp.spawn(
        _all_reduce_worker,
        args=(2, free_port(), preds, targets, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    expected = _metrics_for(pred, target)
    for rank in range(2):
        reduced = SegmentationMetrics(**json.loads((tmp_path / f"rank{rank}.json").read_text()))
        assert reduced.confusion == expected.confusion
        assert reduced.iou == pytest.approx(expected.iou)
        assert reduced.miou == pytest.approx(expected.miou)
        assert reduced.overall_accuracy == pytest.approx(expected.overall_accuracy)
