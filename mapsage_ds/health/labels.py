"""Check 1: classes and ignore index agree everywhere; raw masks are class indices; no-data is ignored."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import nn

from mapsage_ds.data.classes import IGNORE_INDEX, LOVEDA_PALETTE, NUM_CLASSES
from mapsage_ds.data.loveda import check_mask_mode
from mapsage_ds.errors import DataError
from mapsage_ds.health.result import CheckResult, failed, passed, warned

RAW_VALUES = range(NUM_CLASSES + 1)  # 0 no-data, 1..7 classes
_LISTED = 5


def loss_ignore_indices(loss: Any) -> dict[str, int]:
    """``ignore_index`` of the loss and of every part inside it, by part name.

    Walks ``nn.Module`` children, and the ``parts`` mapping and ``boundary`` term of a composite
    loss that is a plain callable (:class:`mapsage_ds.losses.CompositeLoss`).
    """
    found: dict[str, int] = {}

    def visit(part: Any, name: str) -> None:
        if hasattr(part, "ignore_index"):
            found[name or type(part).__name__] = part.ignore_index
        children: dict[str, Any] = {}
        if isinstance(part, nn.Module):
            children.update(part.named_children())
        else:
            if isinstance(getattr(part, "parts", None), Mapping):
                children.update(part.parts)
            if getattr(part, "boundary", None) is not None:
                children["boundary"] = part.boundary
        for key, child in children.items():
            visit(child, f"{name}.{key}" if name else key)

    visit(loss, "")
    return found


def check_label_agreement(
    *,
    class_names: Sequence[str],
    dataset_ignore_index: int,
    model_num_classes: int,
    loss: Any,
    metric_num_classes: int,
    metric_ignore_index: int,
    expected_classes: int = NUM_CLASSES,
    expected_ignore_index: int = IGNORE_INDEX,
) -> CheckResult:
    """The dataset, the model, the loss and the metric agree on 7 classes and ignore index 255.

    Args:
        class_names: The dataset's class names.
        dataset_ignore_index: The label the dataset gives no-data pixels.
        model_num_classes: Channels of the model's logits.
        loss: The training loss; every part with an ``ignore_index`` is read.
        metric_num_classes: Classes of the evaluation metric.
        metric_ignore_index: Ignore index of the evaluation metric.
        expected_classes: What all of them must say.
        expected_ignore_index: The ignore index all of them must use.
    """
    name = "1.classes_ignore_index"
    loss_ignores = loss_ignore_indices(loss)
    counts = {"dataset": len(class_names), "model": model_num_classes, "metric": metric_num_classes}
    ignores = {"dataset": dataset_ignore_index, "metric": metric_ignore_index,
               **{f"loss.{part}": value for part, value in loss_ignores.items()}}
    problems = [f"{who} has {n} classes" for who, n in counts.items() if n != expected_classes]
    problems += [f"{who} ignores {value}" for who, value in ignores.items() if value != expected_ignore_index]
    if not loss_ignores:
        problems.append(f"the loss {type(loss).__name__} exposes no ignore_index, so it may train on no-data")
    details = {"classes": counts, "ignore_index": ignores}
    if problems:
        return failed(name, f"expected {expected_classes} classes, ignore {expected_ignore_index}",
                      "; ".join(problems),
                      f"build every part with num_classes={expected_classes} and ignore_index={expected_ignore_index} "
                      "(mapsage_ds.data.classes)", **details)
    return passed(name, f"{expected_classes} classes, ignore {expected_ignore_index}",
                  f"dataset, model, metric and {len(loss_ignores)} loss part(s) agree", **details)


def _palette_colours(rgb: np.ndarray) -> int:
    """How many of the LoveDA palette colours occur in an RGB array."""
    colours = {tuple(c) for c in np.unique(rgb.reshape(-1, rgb.shape[-1])[:, :3], axis=0).tolist()}
    return sum(tuple(c) in colours for c in LOVEDA_PALETTE)


def inspect_raw_mask(path: str | Path) -> tuple[list[int], str | None]:
    """Values stored in a raw mask file, read with PIL alone, and what is wrong with it (None if nothing).

    A multi-band mask (a palette rendering such as RGB colours) is reported as such; a
    single-band mask must hold only raw LoveDA values 0..7.
    """
    try:
        with Image.open(path) as image:
            mode = image.mode
            array = np.array(image)
    except (OSError, SyntaxError, ValueError) as error:
        return [], f"unreadable ({error})"
    try:
        check_mask_mode(mode, str(path))
    except DataError:
        if array.ndim == 3:
            hits = _palette_colours(array)
            colours = len(np.unique(array.reshape(-1, array.shape[-1]), axis=0))
            kind = f"{hits} LoveDA palette colours" if hits else f"{colours} colours"
            return [], f"mode {mode}: {array.shape[-1]}-channel colour mask ({kind}), not class indices"
        return [], f"mode {mode}: not single-channel integer class indices"
    values = np.unique(array).tolist()
    bad = [v for v in values if v not in RAW_VALUES]
    if bad:
        return values, f"values {bad[:8]} outside 0..7"
    return values, None


def inspect_raw_masks(paths: Sequence[str | Path]) -> list[tuple[str, list[int], str | None]]:
    """:func:`inspect_raw_mask` of each path, as ``(path, values, problem)``."""
    return [(str(path), *inspect_raw_mask(path)) for path in paths]


def check_raw_masks(inspections: Sequence[tuple[str, list[int], str | None]]) -> CheckResult:
    """Raw mask files are single-channel class indices with values in 0..7 (LoveDA's raw encoding).

    Args:
        inspections: ``(path, values, problem)`` per mask file, from :func:`inspect_raw_masks`.
    """
    name = "1.raw_mask_values"
    if not inspections:
        return failed(name, "0 masks", "no mask file to inspect", "check --data-root and the split folders")
    seen: set[int] = set()
    problems = []
    for path, values, problem in inspections:
        seen.update(values)
        if problem is not None:
            problems.append(f"{path}: {problem}")
    figure = f"{len(inspections) - len(problems)}/{len(inspections)} masks ok, values {sorted(seen)}"
    details = {"masks": len(inspections), "bad": len(problems), "values": sorted(seen), "problems": problems[:50]}
    if problems:
        more = f" (+{len(problems) - _LISTED} more)" if len(problems) > _LISTED else ""
        return failed(name, figure, "; ".join(problems[:_LISTED]) + more,
                      "masks must be single-band PNGs of raw LoveDA values (0 no-data, 1..7 classes); "
                      "re-export the masks from the official archive, not a colour rendering", **details)
    return passed(name, figure, "all single-channel with raw values in 0..7", **details)


def check_nodata_mapping(pairs: Iterable[tuple[np.ndarray, np.ndarray]], *,
                         ignore_index: int = IGNORE_INDEX) -> CheckResult:
    """Raw no-data (0) becomes the ignore index and raw 1..7 become 0..6 in what training sees.

    Args:
        pairs: (raw mask as stored on disk, mask as the dataset returns it) of the same item.
        ignore_index: The label no-data must map to.
    """
    name = "1.nodata_to_ignore"
    nodata = labelled = wrong_nodata = wrong_class = 0
    nodata_became: set[int] = set()
    for raw, encoded in pairs:
        raw, encoded = np.asarray(raw), np.asarray(encoded)
        if raw.shape != encoded.shape:
            return failed(name, "shape mismatch", f"raw mask {raw.shape} vs dataset mask {encoded.shape}",
                          "the dataset must return the mask at the size stored on disk")
        is_nodata = raw == 0
        nodata += int(is_nodata.sum())
        labelled += int((~is_nodata).sum())
        wrong = is_nodata & (encoded != ignore_index)
        wrong_nodata += int(wrong.sum())
        nodata_became.update(np.unique(encoded[wrong]).tolist())
        wrong_class += int((~is_nodata & (encoded.astype(np.int64) != raw.astype(np.int64) - 1)).sum())
    figure = f"{nodata} no-data px, {labelled} labelled px"
    details = {"nodata_pixels": nodata, "labelled_pixels": labelled, "nodata_not_ignored": wrong_nodata,
               "classes_shifted_wrongly": wrong_class}
    if wrong_nodata or wrong_class:
        parts = []
        if wrong_nodata:
            parts.append(f"{wrong_nodata} no-data pixels became class(es) {sorted(nodata_became)} instead of "
                         f"{ignore_index}")
        if wrong_class:
            parts.append(f"{wrong_class} labelled pixels are not raw − 1")
        return failed(name, figure, "; ".join(parts),
                      f"encode masks with mapsage_ds.data.classes.encode_loveda_mask (0 → {ignore_index}, k → k − 1); "
                      "no-data must never count as background", **details)
    if nodata == 0:
        return warned(name, figure, "labels are raw − 1, but no no-data pixel was in the sample to verify",
                      "run with --full, or include tiles with no-data", **details)
    return passed(name, figure, f"no-data → {ignore_index}, raw k → k − 1", **details)
