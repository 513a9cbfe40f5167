"""Reports on disk: metrics.json, markdown, PNG figures and panels, and a leaderboard from those files alone."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mapsage_ds.data.classes import LOVEDA_CLASSES, LOVEDA_PALETTE
from mapsage_ds.errors import DataError, MissingFileError
from mapsage_ds.evaluation.loop import Panel
from mapsage_ds.evaluation.metrics import ConfusionMatrix, SegmentationMetrics
from mapsage_ds.evaluation.report import (
    colorize,
    leaderboard_markdown,
    overlay,
    read_report,
    row_normalised,
    save_label_png,
    write_report,
)


def _metrics(seed: int, agreement: float) -> SegmentationMetrics:
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 7, (2, 16, 16), generator=generator)
    target[target == 4] = 3  # class "barren" absent from ground truth ...
    pred = torch.where(torch.rand(target.shape, generator=generator) < agreement, target,
                       torch.randint(0, 7, target.shape, generator=generator))
    pred[pred == 4] = 3  # ... and from the prediction: its scores are NaN
    matrix = ConfusionMatrix(7, class_names=list(LOVEDA_CLASSES))
    matrix.update(pred, target)
    metrics = matrix.compute()
    boundary = [v * 0.8 for v in metrics.iou]
    return dataclasses.replace(metrics, boundary_iou=boundary, mean_boundary_iou=float(np.nanmean(boundary)))


def _panel(name: str) -> Panel:
    image = torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8)
    mask = torch.randint(0, 7, (20, 24))
    mask[:3] = 255
    return Panel(name, image, mask, torch.randint(0, 7, (20, 24)))


def _strict_json(path):
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=reject)


def test_write_report_writes_every_file(tmp_path):
    metrics, before = _metrics(0, 0.7), _metrics(0, 0.6)
    info = {"name": "b5", "split": "Val", "protocol": {"mode": "slide", "tile": 1024, "stride": 512,
                                                       "scales": [1.0], "flips": ["h"]}}
    out = write_report(tmp_path / "report", metrics, info=info, before=before,
                       panels=[_panel("Urban/1.png"), _panel("Rural/2.png")])

    data = _strict_json(out / "metrics.json")
    assert data["name"] == "b5" and data["protocol"]["tile"] == 1024
    assert data["miou"] == pytest.approx(metrics.miou)
    assert data["iou"][4] is None  # NaN written as null
    assert data["confusion"] == metrics.confusion
    assert data["before_refinement"]["miou"] == pytest.approx(before.miou)

    table = (out / "metrics.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 7 + 1  # header, classes, mean
    building = rows[2].split("|")
    assert building[1].strip() == "building"
    assert building[2].strip() == f"{100 * metrics.iou[1]:.2f}"
    assert building[6].strip() == f"{100 * before.iou[1]:.2f}"
    assert "n/a" in rows[5]

    for name in ("confusion_matrix.png", "iou_per_class.png", "panels/Urban_1.png", "panels/Rural_2.png"):
        with Image.open(out / name) as image:
            assert image.size[0] > 100 and image.size[1] > 100


def test_confusion_figure_is_row_normalised():
    normalised = row_normalised([[2, 2, 0], [0, 0, 0], [1, 0, 3]])
    assert np.allclose(normalised, [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [0.25, 0.0, 0.75]])


def test_colours_follow_the_loveda_palette():
    colours = colorize(np.array([[0, 1], [6, 255]]))
    assert colours.dtype == np.uint8 and colours.shape == (2, 2, 3)
    assert tuple(colours[0, 0]) == LOVEDA_PALETTE[0] and tuple(colours[0, 1]) == LOVEDA_PALETTE[1]
    assert tuple(colours[1, 0]) == LOVEDA_PALETTE[6] and tuple(colours[1, 1]) == (0, 0, 0)
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    labels = np.array([[0, 1], [2, 3]])
    assert np.array_equal(overlay(image, labels, alpha=0.0), image)
    assert np.array_equal(overlay(image, labels, alpha=1.0), colorize(labels))


def test_label_png_is_single_channel_class_indices(tmp_path):
    labels = np.arange(7, dtype=np.uint8).repeat(3).reshape(3, 7)
    save_label_png(labels, tmp_path / "1.png")
    with Image.open(tmp_path / "1.png") as image:
        assert image.mode == "L"
        assert np.array_equal(np.array(image), labels)
    with pytest.raises(DataError):
        save_label_png(np.zeros((2, 2, 3)), tmp_path / "bad.png")


def test_leaderboard_from_report_files_alone(tmp_path):
    weak, strong = _metrics(1, 0.3), _metrics(1, 0.9)
    write_report(tmp_path / "weak", weak, info={"name": "segformer-b2", "split": "Val",
                                                "protocol": {"mode": "whole", "scales": [1.0], "flips": []}})
    write_report(tmp_path / "strong", strong, info={"name": "ensemble", "split": "Val",
                                                    "protocol": {"mode": "slide", "tile": 1024, "stride": 512,
                                                                 "scales": [0.75, 1.0], "flips": ["h"]},
                                                    "refinement": {"method": "sam"}})
    for leftover in ("metrics.md", "confusion_matrix.png", "iou_per_class.png"):
        (tmp_path / "weak" / leftover).unlink()  # the leaderboard needs metrics.json only
    table = leaderboard_markdown([tmp_path / "weak", tmp_path / "strong" / "metrics.json"])
    lines = table.splitlines()
    assert lines[0].split("|")[2].strip() == "run" and "agriculture" in lines[0]
    first, second = lines[2].split("|"), lines[3].split("|")
    assert first[2].strip() == "ensemble" and second[2].strip() == "segformer-b2"
    assert first[3].strip() == f"{100 * strong.miou:.2f}"
    assert first[8].strip() == "slide 1024/512 s0.75,1 flip h +sam"
    assert second[-2].strip() == f"{100 * weak.iou[6]:.2f}"
    assert read_report(tmp_path / "weak")["miou"] == pytest.approx(weak.miou)
    assert math.isnan(weak.iou[4]) and second[9 + 4].strip() == "n/a"


def test_leaderboard_errors(tmp_path):
    with pytest.raises(MissingFileError):
        leaderboard_markdown([tmp_path / "missing"])
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "metrics.json").write_text(json.dumps({"loss": 1.0}))
    with pytest.raises(DataError, match="not an evaluation report"):
        leaderboard_markdown([tmp_path / "x"])
    write_report(tmp_path / "a", _metrics(2, 0.5), info={"name": "a"})
    other = dataclasses.replace(_metrics(2, 0.5), class_names=[f"c{i}" for i in range(7)])
    write_report(tmp_path / "b", other, info={"name": "b"})
    with pytest.raises(DataError, match="not comparable"):
        leaderboard_markdown([tmp_path / "a", tmp_path / "b"])
