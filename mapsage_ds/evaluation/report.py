"""Evaluation reports on disk, and a leaderboard built from those files alone.

A report directory holds:
    * ``metrics.json``: the run's description (models, split, protocol, refinement) and every
      score: per-class IoU / F1 / boundary IoU, their means, OA, the confusion matrix;
    * ``metrics.md``: the per-class table in markdown;
    * ``confusion_matrix.png``: row-normalised (each ground-truth row sums to 1);
    * ``iou_per_class.png``: per-class IoU (and boundary IoU) bars;
    * ``panels/*.png``: image | ground truth | prediction for a few images.

Colours are :data:`~mapsage_ds.data.classes.LOVEDA_PALETTE` (ignored pixels black).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mapsage_ds.data.classes import LOVEDA_PALETTE
from mapsage_ds.errors import DataError, MissingFileError
from mapsage_ds.evaluation.metrics import SegmentationMetrics, class_names_or_default, percent
from mapsage_ds.files import json_safe, write_json

__all__ = ["METRICS_FILE", "colorize", "leaderboard_markdown", "leaderboard_table", "metrics_markdown", "overlay",
           "read_report", "report_dict", "row_normalised", "save_label_png", "write_report"]

METRICS_FILE = "metrics.json"
_IGNORE_COLOUR = (0, 0, 0)


def colorize(labels: np.ndarray, palette: Sequence[tuple[int, int, int]] = LOVEDA_PALETTE) -> np.ndarray:
    """``uint8 [H, W, 3]`` colours of class indices ``[H, W]``; values outside the palette are black."""
    labels = np.asarray(labels)
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:] = _IGNORE_COLOUR
    table[:len(palette)] = np.asarray(palette, dtype=np.uint8)
    return table[np.clip(labels, 0, 255).astype(np.uint8)]


def overlay(image: np.ndarray, labels: np.ndarray, *, alpha: float = 0.5) -> np.ndarray:
    """Blend the colour mask of ``labels`` over an RGB ``uint8 [H, W, 3]`` image."""
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * colorize(labels).astype(np.float32)
    return np.clip(mixed + 0.5, 0, 255).astype(np.uint8)


def metrics_markdown(metrics: SegmentationMetrics, *, before: SegmentationMetrics | None = None) -> str:
    """Markdown table of per-class IoU, F1, boundary IoU and ground-truth pixels, plus the means.

    With ``before`` (coarse scores of a refined run), IoU and boundary IoU before refinement
    get their own columns.
    """
    header = ["Class", "IoU %", "F1 %", "Boundary IoU %", "GT pixels"]
    if before is not None:
        header += ["IoU % before refinement", "Boundary IoU % before refinement"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = metrics.class_rows()
    before_rows = before.class_rows() if before is not None else [None] * len(rows)
    for r, b in zip(rows, before_rows, strict=True):
        row = [r.name, percent(r.iou), percent(r.f1), percent(r.boundary_iou), str(r.pixels)]
        if b is not None:
            row += [percent(b.iou), percent(b.boundary_iou)]
        lines.append("| " + " | ".join(row) + " |")
    row = ["**mean**", percent(metrics.miou), percent(metrics.mean_f1), percent(metrics.mean_boundary_iou),
           str(sum(map(sum, metrics.confusion)))]
    if before is not None:
        row += [percent(before.miou), percent(before.mean_boundary_iou)]
    lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(f"Overall accuracy: {percent(metrics.overall_accuracy)} %. Means are over classes "
                 "(n/a classes, absent from ground truth and prediction, are left out).")
    return "\n".join(lines) + "\n"


def _figure(width: float, height: float):
    # A bare Figure with an Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def row_normalised(confusion: Sequence[Sequence[int]]) -> np.ndarray:
    """Each ground-truth row divided by its sum (a row without pixels stays zero)."""
    matrix = np.asarray(confusion, dtype=np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)


def _plot_confusion(metrics: SegmentationMetrics, path: Path) -> None:
    names = class_names_or_default(metrics.class_names, len(metrics.iou))
    normalised = row_normalised(metrics.confusion)
    figure = _figure(1.2 + 0.8 * len(names), 1.0 + 0.8 * len(names))
    axes = figure.add_subplot()
    image = axes.imshow(normalised, vmin=0.0, vmax=1.0, cmap="Blues")
    for row in range(len(names)):
        for col in range(len(names)):
            value = normalised[row, col]
            axes.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
                      color="white" if value > 0.5 else "black")
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes.set_yticks(range(len(names)), names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("ground truth")
    axes.set_title("Confusion matrix (rows sum to 1)")
    figure.colorbar(image, ax=axes, fraction=0.046)
    figure.tight_layout()
    figure.savefig(path)


def _plot_iou_bars(metrics: SegmentationMetrics, path: Path) -> None:
    names = class_names_or_default(metrics.class_names, len(metrics.iou))
    positions = np.arange(len(names))
    iou = np.nan_to_num(np.asarray(metrics.iou, dtype=np.float64))
    figure = _figure(1.5 + 0.9 * len(names), 4.0)
    axes = figure.add_subplot()
    width = 0.4 if metrics.boundary_iou is not None else 0.8
    colours = [tuple(c / 255 for c in LOVEDA_PALETTE[i]) if i < len(LOVEDA_PALETTE) else "grey"
               for i in range(len(names))]
    axes.bar(positions - (width / 2 if metrics.boundary_iou is not None else 0), iou, width, color=colours,
             edgecolor="black", label="IoU")
    if metrics.boundary_iou is not None:
        boundary = np.nan_to_num(np.asarray(metrics.boundary_iou, dtype=np.float64))
        axes.bar(positions + width / 2, boundary, width, color=colours, edgecolor="black", hatch="//",
                 label="boundary IoU")
        axes.legend()
    axes.axhline(metrics.miou, color="black", linestyle="--", linewidth=1)
    axes.text(len(names) - 0.5, metrics.miou, f" mIoU {metrics.miou:.3f}", va="bottom", ha="right")
    axes.set_xticks(positions, names, rotation=30, ha="right")
    axes.set_ylim(0, 1)
    axes.set_ylabel("IoU")
    axes.set_title("Per-class IoU")
    figure.tight_layout()
    figure.savefig(path)


def _save_panel(name: str, image: np.ndarray, mask: np.ndarray, prediction: np.ndarray,
                class_names: Sequence[str], path: Path) -> None:
    from matplotlib.patches import Patch

    figure = _figure(12, 4.6)
    for index, (title, picture) in enumerate((("image", image), ("ground truth", colorize(mask)),
                                              ("prediction", colorize(prediction)))):
        axes = figure.add_subplot(1, 3, index + 1)
        axes.imshow(picture, interpolation="nearest")
        axes.set_title(title)
        axes.axis("off")
    handles = [Patch(facecolor=tuple(c / 255 for c in LOVEDA_PALETTE[i]), edgecolor="black", label=n)
               for i, n in enumerate(class_names) if i < len(LOVEDA_PALETTE)]
    handles.append(Patch(facecolor=_IGNORE_COLOUR, label="ignored"))
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    figure.suptitle(name)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    figure.savefig(path)


def _panel_file_name(name: str) -> str:
    return name.replace("/", "_").replace("\\", "_").rsplit(".", 1)[0] + ".png"




def report_dict(metrics: SegmentationMetrics, *, info: dict[str, Any],
                before: SegmentationMetrics | None = None) -> dict[str, Any]:
    """The content of ``metrics.json``: ``info`` (models, split, protocol ...) plus the scores."""
    data = {**info, **metrics.to_dict()}
    if before is not None:
        data["before_refinement"] = before.to_dict()
    return json_safe(data)


def write_report(
    out_dir: str | Path,
    metrics: SegmentationMetrics,
    *,
    info: dict[str, Any],
    before: SegmentationMetrics | None = None,
    panels: Sequence[Any] = (),
) -> Path:
    """Write the report files into ``out_dir`` (created if needed); returns ``out_dir``.

    Args:
        out_dir: The report directory.
        metrics: The scores.
        info: What was evaluated and how (models, split, protocol, refinement settings);
            stored at the top level of ``metrics.json``. ``info["name"]`` names the run in
            leaderboards.
        before: Scores before refinement, when a refiner ran.
        panels: Items with ``name``, ``image`` (uint8 [3, H, W]), ``mask`` and ``prediction``
            ([H, W]), e.g. :class:`mapsage_ds.evaluation.Panel`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / METRICS_FILE, report_dict(metrics, info=info, before=before))
    title = f"# {info.get('name', out_dir.name)}\n\n"
    (out_dir / "metrics.md").write_text(title + metrics_markdown(metrics, before=before))
    _plot_confusion(metrics, out_dir / "confusion_matrix.png")
    _plot_iou_bars(metrics, out_dir / "iou_per_class.png")
    names = class_names_or_default(metrics.class_names, len(metrics.iou))
    if panels:
        (out_dir / "panels").mkdir(exist_ok=True)
    for panel in panels:
        image = np.asarray(panel.image).transpose(1, 2, 0)
        _save_panel(panel.name, image, np.asarray(panel.mask), np.asarray(panel.prediction), names,
                    out_dir / "panels" / _panel_file_name(panel.name))
    return out_dir


def save_label_png(labels: np.ndarray, path: str | Path) -> None:
    """Write class indices as a single-channel ``uint8`` PNG (the LoveDA benchmark format)."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
        raise DataError(f"{path}: expected [H, W] class indices in 0..255, got shape {labels.shape}")
    Image.fromarray(labels.astype(np.uint8), mode="L").save(path)


def read_report(path: str | Path) -> dict[str, Any]:
    """``metrics.json`` of a report directory (or the file itself).

    Raises:
        MissingFileError: If there is no such file.
        DataError: If it is not a report (no ``miou`` / ``iou``).
    """
    path = Path(path)
    file = path / METRICS_FILE if path.is_dir() else path
    if not file.is_file():
        raise MissingFileError(f"no evaluation report at {path} (expected {file})")
    data = json.loads(file.read_text())
    if not isinstance(data, dict) or "miou" not in data or "iou" not in data:
        raise DataError(f"{file} is not an evaluation report: it has no 'miou' / 'iou'")
    data.setdefault("name", file.parent.name)
    return data


def leaderboard_markdown(reports: Sequence[str | Path]) -> str:
    """A markdown leaderboard of report directories, best mIoU first, from their files alone.

    Columns: rank, run name, mIoU, mean boundary IoU, OA, mean F1, split, protocol, then the
    per-class IoU. Runs whose class names differ cannot share a table and raise ``DataError``.
    """
    rows = [read_report(path) for path in reports]
    if not rows:
        raise DataError("a leaderboard needs at least one report")
    names = class_names_or_default(rows[0].get("class_names"), len(rows[0]["iou"]))
    for row, path in zip(rows, reports):
        other = class_names_or_default(row.get("class_names"), len(row["iou"]))
        if other != names:
            raise DataError(f"{path}: classes {other} differ from {names}; the runs are not comparable")
    return leaderboard_table(rows)


def leaderboard_table(rows: Sequence[dict[str, Any]], *, extra_columns: Sequence[tuple[str, str]] = ()) -> str:
    """The markdown table of :func:`leaderboard_markdown` from report dicts (:func:`report_dict`), best mIoU first.

    The sort is stable: rows of equal mIoU keep their order. ``extra_columns`` are ``(header, key)``
    pairs shown after the protocol (e.g. the TTA sweep's cost); floats print with 4 significant digits.
    """
    rows = sorted(rows, key=lambda r: -(r["miou"] if r["miou"] is not None else -math.inf))
    names = class_names_or_default(rows[0].get("class_names"), len(rows[0]["iou"])) if rows else []
    header = ["#", "run", "mIoU %", "mBIoU %", "OA %", "mF1 %", "split", "protocol",
              *(title for title, _ in extra_columns), *names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, row in enumerate(rows, start=1):
        cells = [str(rank), str(row["name"]), percent(row["miou"]), percent(row.get("mean_boundary_iou")),
                 percent(row.get("overall_accuracy")), percent(row.get("mean_f1")), str(row.get("split", "")),
                 _protocol_summary(row), *(_cell(row.get(key)) for _, key in extra_columns),
                 *(percent(v) for v in row["iou"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _protocol_summary(row: dict[str, Any]) -> str:
    protocol = row.get("protocol")
    if not protocol:
        return ""
    text = protocol.get("mode", "")
    if text == "slide":
        text += f" {protocol.get('tile')}/{protocol.get('stride')}"
    # Reports hold EvalProtocol.to_dict() (tta_scales, tta_flip); "scales"/"flips" are older reports' keys.
    scales = protocol.get("tta_scales") or protocol.get("scales") or [1.0]
    if list(scales) != [1.0]:
        text += " s" + ",".join(f"{s:g}" for s in scales)
    flips = protocol.get("tta_flip") or protocol.get("flips")
    if flips:
        text += " flip " + ",".join(flips)
    if row.get("refinement"):
        text += f" +{row['refinement'].get('method', 'refined')}"
    return text
