"""LoveDA classes, palette and the raw-mask encoding.

LoveDA masks store 0 for no-data and 1..7 for the seven classes. Training labels are the
class values minus one, and no-data becomes the ignore index, so it never counts as
background (the most common LoveDA evaluation bug).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mapsage_ds.errors import DataError

LOVEDA_CLASSES: tuple[str, ...] = (
    "background",
    "building",
    "road",
    "water",
    "barren",
    "forest",
    "agriculture",
)
NUM_CLASSES = 7
IGNORE_INDEX = 255

LOVEDA_PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 255, 255),  # background
    (255, 0, 0),  # building
    (255, 255, 0),  # road
    (0, 0, 255),  # water
    (159, 129, 183),  # barren
    (0, 255, 0),  # forest
    (255, 195, 128),  # agriculture
)

_RAW_NODATA = 0
_MAX_LISTED_VALUES = 16

# raw value -> training label; entries above 7 are never read (out-of-range raises first).
_RAW_TO_LABEL = np.full(256, IGNORE_INDEX, dtype=np.uint8)
_RAW_TO_LABEL[1 : NUM_CLASSES + 1] = np.arange(NUM_CLASSES, dtype=np.uint8)


def _require_2d(mask: np.ndarray, source: str) -> None:
    if mask.ndim != 2:
        raise DataError(
            f"{source}: mask has shape {tuple(mask.shape)}; masks must be single-channel class "
            "indices of shape (H, W), not palette colours or multi-band images"
        )


def _list_values(values: np.ndarray) -> str:
    values = np.unique(values)
    listed = ", ".join(str(v) for v in values[:_MAX_LISTED_VALUES].tolist())
    more = f" (+{values.size - _MAX_LISTED_VALUES} more)" if values.size > _MAX_LISTED_VALUES else ""
    return f"[{listed}]{more}"


def encode_loveda_mask(raw: np.ndarray, source: str) -> np.ndarray:
    """Map raw LoveDA mask values to training labels.

    Raw 0 (no-data) becomes ``IGNORE_INDEX`` and raw 1..7 become 0..6.

    Args:
        raw: Raw LoveDA mask of integer values 0..7.
        source: Where the mask came from (a file path or row id), used in error messages.

    Returns:
        The encoded ``uint8`` mask with values 0..6 and 255.

    Raises:
        DataError: If the mask is not 2-D, not of an integer type, or holds values outside 0..7.

    Shape:
        - raw: (H, W)
        - output: (H, W)
    """
    _require_2d(raw, source)
    if not np.issubdtype(raw.dtype, np.integer):
        raise DataError(f"{source}: mask has dtype {raw.dtype}; expected integer class values 0..7")
    bad = (raw < _RAW_NODATA) | (raw > NUM_CLASSES)
    if bad.any():
        raise DataError(
            f"{source}: raw LoveDA mask holds values {_list_values(raw[bad])} outside 0..7 "
            "(0 = no-data, 1..7 = background..agriculture)"
        )
    return _RAW_TO_LABEL[raw]


def check_index_mask(mask: np.ndarray, source: str) -> np.ndarray:
    """Validate a mask that already holds training labels.

    Args:
        mask: Mask of training labels 0..6 and ``IGNORE_INDEX``.
        source: Where the mask came from, used in error messages.

    Returns:
        The mask as ``uint8``.

    Raises:
        DataError: If the mask is not 2-D, not of an integer type, or holds any other value.

    Shape:
        - mask: (H, W)
        - output: (H, W)
    """
    _require_2d(mask, source)
    if not np.issubdtype(mask.dtype, np.integer):
        raise DataError(f"{source}: mask has dtype {mask.dtype}; expected integer class indices")
    bad = ((mask < 0) | (mask >= NUM_CLASSES)) & (mask != IGNORE_INDEX)
    if bad.any():
        raise DataError(
            f"{source}: index mask holds values {_list_values(mask[bad])}; expected class indices "
            f"0..{NUM_CLASSES - 1} or the ignore index {IGNORE_INDEX}"
        )
    return mask.astype(np.uint8, copy=False)


# data.hf_mask_encoding: how a Hugging Face dataset's masks map to class indices.
MASK_ENCODINGS: dict[str, Callable[[np.ndarray, str], np.ndarray]] = {
    "loveda_raw": encode_loveda_mask,
    "index": check_index_mask,
}
