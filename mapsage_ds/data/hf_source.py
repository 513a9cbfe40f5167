"""Segmentation data from a local Hugging Face ``datasets`` dataset.

Reads a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, a parquet
file, or a directory of parquet files. A directory of parquet files is split as Hugging Face's own
loader splits it (:func:`parquet_splits`): files or folders named for a split
(``train-00000-of-00002.parquet``, ``validation.parquet``, ``val/part-0.parquet`` ...) form that
split, and a directory with no split names is the one split ``train``. Items match
:class:`mapsage_ds.data.loveda.LoveDA`, so either source feeds the same transforms, loss and metric.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets.data_files import DataFilesDict, get_data_patterns
from PIL import Image
from torch.utils.data import Dataset

from mapsage_ds.data.classes import MASK_ENCODINGS
from mapsage_ds.data.loveda import decode_mask, decode_rgb, image_to_tensor, mask_to_tensor
from mapsage_ds.data.validation import CheckItem, file_stamp
from mapsage_ds.errors import ConfigError, DataError, MissingFileError

_NAME_COLUMNS = ("name", "file_name")
_SAVE_TO_DISK_MARKERS = ("dataset_dict.json", "state.json")
_PARQUET_SPLIT = "train"  # what load_dataset("parquet", ...) names its only split
_PIL_ERRORS = (OSError, SyntaxError, ValueError)


def _load_parquet(files: list[Path], cache_dir: str | Path | None) -> datasets.Dataset:
    return datasets.load_dataset(
        "parquet",
        data_files=[str(f) for f in files],
        split=_PARQUET_SPLIT,
        cache_dir=None if cache_dir is None else str(cache_dir),
    )


def parquet_splits(path: str | Path) -> dict[str, list[Path]]:
    """The ``.parquet`` files of each split under the directory ``path``, named as ``datasets`` names them.

    Hugging Face's split inference (``datasets.data_files.get_data_patterns``) decides: a file or
    folder whose name holds a split name (``train``/``training``; ``validation``/``valid``/``val``/``dev``;
    ``test``/``testing``/``eval``/``evaluation``) belongs to that split, anything else makes the whole
    directory the one split ``train``. Splits without a ``.parquet`` file are left out.
    """
    base = str(path)
    found = DataFilesDict.from_patterns(get_data_patterns(base), base_path=base)
    splits = {str(split): sorted(Path(f) for f in files if f.endswith(".parquet")) for split, files in found.items()}
    return {split: files for split, files in splits.items() if files}


def _load_parquet_split(path: Path, split: str | None, cache_dir: str | Path | None) -> datasets.Dataset:
    splits = parquet_splits(path)
    if split is None and len(splits) == 1:
        split = next(iter(splits))
    if split not in splits:
        named = {name: [str(f.relative_to(path)) for f in files][:3] for name, files in splits.items()}
        raise ConfigError(
            f"{path}: split {split!r} not found; its parquet files form the splits {named} (a file or folder "
            "named for a split, e.g. validation-00000.parquet or validation/, belongs to that split; pass one "
            "as split=...)"
        )
    return _load_parquet(splits[split], cache_dir)


def _select_split(
    data: datasets.Dataset | datasets.DatasetDict, split: str | None, path: Path
) -> datasets.Dataset:
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ConfigError(
                f"{path}: split {split!r} not found; available splits are {sorted(data)} (pass one as split=...)"
            )
        return data[split]
    own_split = None if data.split is None else str(data.split)
    if split is not None and split != own_split:
        raise ConfigError(
            f"{path} holds a single dataset (split {own_split!r}), not a DatasetDict; "
            f"split must be None{'' if own_split is None else f' or {own_split!r}'}, got {split!r}"
        )
    return data


def load_local_dataset(
    path: str | Path, split: str | None = None, cache_dir: str | Path | None = None
) -> datasets.Dataset:
    """Load one split of a local Hugging Face dataset.

    Args:
        path: A ``save_to_disk`` directory, a ``.parquet`` file, or a directory of ``.parquet`` files
            (split by file and folder names, :func:`parquet_splits`).
        split: The split of a ``DatasetDict`` or of a parquet directory; for a single dataset (or a
            directory of one split), None or that dataset's own split.
        cache_dir: Where ``datasets`` caches the Arrow files built from parquet (its default if None).

    Returns:
        The selected dataset.

    Raises:
        MissingFileError: If ``path`` does not exist.
        ConfigError: If ``path`` is of an unsupported kind or ``split`` does not match its splits.
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"Hugging Face dataset not found: {path} does not exist")
    if path.is_file():
        if path.suffix != ".parquet":
            kind = path.suffix or "suffix-less"
            raise ConfigError(f"{path}: expected a .parquet file or a directory, got a {kind} file")
        return _select_split(_load_parquet([path], cache_dir), split, path)
    if any((path / marker).is_file() for marker in _SAVE_TO_DISK_MARKERS):
        return _select_split(datasets.load_from_disk(str(path)), split, path)
    if not any(path.rglob("*.parquet")):
        raise ConfigError(
            f"{path}: neither a save_to_disk directory (no {' or '.join(_SAVE_TO_DISK_MARKERS)}) "
            "nor a directory of .parquet files"
        )
    return _load_parquet_split(path, split, cache_dir)


def _open_image(value: Any, source: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            value = value["bytes"]
        elif value.get("path"):
            file = Path(value["path"])
            if not file.is_file():
                raise MissingFileError(f"{source}: refers to image file {file}, which does not exist")
            value = file.read_bytes()
        else:
            raise DataError(f"{source}: image dict has neither 'bytes' nor 'path'")
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise DataError(
            f"{source}: holds a {type(value).__name__}; expected a PIL image (datasets Image feature), "
            "encoded image bytes or a {'bytes': ...} dict"
        )
    try:
        return Image.open(io.BytesIO(value))
    except _PIL_ERRORS as err:
        raise DataError(f"{source}: cannot read as an image ({err})") from err


class HFSegmentationDataset(Dataset):
    """Image/mask pairs from a local Hugging Face dataset, in the :class:`LoveDA` item format.

    Each item is ``{"image": uint8[3, H, W], "mask": int64[H, W], "name": str}``; without a mask
    column there is no ``"mask"``. The name comes from a ``name`` or ``file_name`` column if the
    dataset has one, else it is the zero-padded row index.

    Args:
        path: A ``save_to_disk`` directory, a ``.parquet`` file, or a directory of ``.parquet`` files
            (split by file and folder names, :func:`parquet_splits`).
        split: The split of a ``DatasetDict`` or of a parquet directory; for a single dataset (or a
            directory of one split), None or that dataset's own split.
        image_column: Column of RGB images.
        mask_column: Column of single-channel masks, or None for an image-only dataset.
        mask_encoding: ``"loveda_raw"`` for raw LoveDA values (0 no-data, 1..7 classes) or
            ``"index"`` for masks already holding 0..6 and 255.
        cache_dir: Where ``datasets`` caches the Arrow files built from parquet (its default if None).

    Raises:
        MissingFileError: If ``path`` does not exist.
        ConfigError: If the path kind, split, a column or ``mask_encoding`` is not supported.
    """

    def __init__(
        self,
        path: str | Path,
        split: str | None = None,
        image_column: str = "image",
        mask_column: str | None = "mask",
        mask_encoding: str = "loveda_raw",
        cache_dir: str | Path | None = None,
    ) -> None:
        if mask_encoding not in MASK_ENCODINGS:
            raise ConfigError(f"mask_encoding {mask_encoding!r} is unknown; expected one of {list(MASK_ENCODINGS)}")
        self.path = Path(path)
        self.split = split
        self.mask_encoding = mask_encoding
        data = load_local_dataset(self.path, split=split, cache_dir=cache_dir)
        for column in (image_column, mask_column):
            if column is not None and column not in data.column_names:
                raise ConfigError(
                    f"{self.path}: column {column!r} not found; available columns are {data.column_names}"
                )
        self.image_column = image_column
        self.mask_column = mask_column
        self.has_masks = mask_column is not None
        self._encode = MASK_ENCODINGS[mask_encoding]
        self._name_column = next((c for c in _NAME_COLUMNS if c in data.column_names), None)
        self.data = self._without_decoding(data)

    def _without_decoding(self, data: datasets.Dataset) -> datasets.Dataset:
        # We decode ourselves, so a corrupt row raises a DataError naming the row.
        for column in (self.image_column, self.mask_column):
            if column is not None and isinstance(data.features[column], datasets.Image):
                data = data.cast_column(column, datasets.Image(decode=False))
        return data

    def validation_scope(self) -> str:
        """The cache scope of :func:`~mapsage_ds.data.validation.validate_dataset`: the resolved path and split."""
        return f"hf {self.path.resolve()} {self.split}"

    def _content_stamp(self) -> str:
        """A stamp of everything a row's check depends on: fingerprint, files, columns and encoding."""
        files = [Path(f["filename"]) for f in self.data.cache_files]
        files += [self.path] if self.path.is_file() else sorted(p for p in self.path.rglob("*") if p.is_file())
        content = {
            "fingerprint": self.data._fingerprint,
            "files": {str(f): file_stamp(f) for f in dict.fromkeys(files)},
            "columns": [self.image_column, self.mask_column],
            "mask_encoding": self.mask_encoding,
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:32]

    def check_items(self) -> list[CheckItem]:
        """Every row, decoded through ``__getitem__``; all rows share one stamp of the dataset's content."""
        stamp = self._content_stamp()
        return [CheckItem(key=f"row {i}", stamp=stamp, source=f"{self.path} row {i}",
                          check=lambda i=i: self[i]) for i in range(len(self))]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        row = self.data[index]
        source = f"{self.path} row {index}"
        image_source = f"{source} column {self.image_column!r}"
        image = decode_rgb(_open_image(row[self.image_column], image_source), image_source)
        name = f"{index:06d}" if self._name_column is None else str(row[self._name_column])
        item: dict[str, torch.Tensor | str] = {"image": image_to_tensor(image), "name": name}
        if self.mask_column is None:
            return item
        mask_source = f"{source} column {self.mask_column!r}"
        mask = decode_mask(_open_image(row[self.mask_column], mask_source), mask_source)
        if mask.shape != image.shape[:2]:
            raise DataError(
                f"{source}: image is {image.shape[0]}x{image.shape[1]} but mask is "
                f"{mask.shape[0]}x{mask.shape[1]} (height x width); they must match"
            )
        item["mask"] = mask_to_tensor(self._encode(mask, mask_source))
        return item

    def __repr__(self) -> str:
        return f"HFSegmentationDataset(path={str(self.path)!r}, n={len(self)})"
