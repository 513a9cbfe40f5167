"""The LoveDA dataset read from its official folder layout, or from the layout mmsegmentation converts it to.

Layouts (detected from the root, see :func:`detect_layout`):

* ``official``: ``{root}/{Train,Val,Test}/{Urban,Rural}/{images_png,masks_png}/*.png``, as LoveDA's
  zip files unpack.
* ``mmseg``: ``{root}/img_dir/{train,val,test}/*.png`` and ``{root}/ann_dir/{train,val}/*.png``, as
  mmsegmentation's ``tools/dataset_converters/loveda.py`` leaves it: it moves every Urban and Rural
  file of a split into one folder (LoveDA's file names are unique across scenes), so the scene of a
  tile is no longer known and only ``scenes="both"`` can be read. The splits keep their names here
  (``Train``, ``Val``, ``Test`` map to ``train``, ``val``, ``test``). The converter moves the masks
  unchanged, and mmseg's ``LoveDADataset`` reads them with ``reduce_zero_label=True``: the label
  encoding is LoveDA's raw one (0 no-data, 1..7 classes), encoded exactly as for the official layout.

An image and its mask share a file name. Every file header is checked when the dataset is built,
so a broken tree fails before training starts rather than hours into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mapsage_ds.data.classes import encode_loveda_mask
from mapsage_ds.data.validation import CheckItem, file_stamp
from mapsage_ds.errors import ConfigError, DataError, MissingFileError

SPLITS: tuple[str, ...] = ("Train", "Val", "Test")
SCENES: dict[str, tuple[str, ...]] = {
    "urban": ("Urban",),
    "rural": ("Rural",),
    "both": ("Urban", "Rural"),
}
IMAGE_DIR = "images_png"
MASK_DIR = "masks_png"
LAYOUTS = ("official", "mmseg")
MMSEG_IMAGE_DIR = "img_dir"
MMSEG_MASK_DIR = "ann_dir"
# Our split names -> the folders mmseg's converter writes (Train.zip -> img_dir/train, ...).
MMSEG_SPLITS: dict[str, str] = {"Train": "train", "Val": "val", "Test": "test"}

_IMAGE_MODE = "RGB"
# Single-band integer modes; "P" masks are read as their palette indices, which are the labels.
_MASK_MODES = frozenset({"L", "P", "I", "I;16", "I;16L", "I;16B"})
_MAX_LISTED_FILES = 5
# PIL signals unreadable or truncated files with any of these.
_PIL_ERRORS = (OSError, SyntaxError, ValueError)


def check_image_mode(mode: str, source: str) -> None:
    """Raise unless an image's PIL mode is RGB.

    Args:
        mode: The PIL mode of the image.
        source: The file or row the image came from, used in the error message.

    Raises:
        DataError: If the mode is not ``"RGB"``.
    """
    if mode != _IMAGE_MODE:
        raise DataError(f"{source}: image has mode {mode!r}; expected an RGB image (mode 'RGB')")


def check_mask_mode(mode: str, source: str) -> None:
    """Raise unless a mask's PIL mode holds single-channel class indices.

    Args:
        mode: The PIL mode of the mask.
        source: The file or row the mask came from, used in the error message.

    Raises:
        DataError: If the mode is multi-band (e.g. an RGB palette rendering) or not integer.
    """
    if mode not in _MASK_MODES:
        raise DataError(
            f"{source}: mask has mode {mode!r}; masks must be single-channel class indices "
            f"(one of {sorted(_MASK_MODES)}), not palette colours"
        )


def decode_rgb(image: Image.Image, source: str) -> np.ndarray:
    """Decode an RGB PIL image into an array.

    Args:
        image: An opened (possibly not yet decoded) PIL image.
        source: The file or row the image came from, used in error messages.

    Returns:
        A ``uint8`` array of shape (H, W, 3).

    Raises:
        DataError: If the image is not RGB or its pixel data is corrupt.
    """
    check_image_mode(image.mode, source)
    try:
        return np.array(image)
    except _PIL_ERRORS as err:
        raise DataError(f"{source}: cannot decode image ({err})") from err


def decode_mask(mask: Image.Image, source: str) -> np.ndarray:
    """Decode a single-channel PIL mask into an array of its stored values.

    Args:
        mask: An opened (possibly not yet decoded) PIL image.
        source: The file or row the mask came from, used in error messages.

    Returns:
        An integer array of shape (H, W).

    Raises:
        DataError: If the mask is not single-channel or its pixel data is corrupt.
    """
    check_mask_mode(mask.mode, source)
    try:
        return np.array(mask)
    except _PIL_ERRORS as err:
        raise DataError(f"{source}: cannot decode mask ({err})") from err


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """Turn an (H, W, 3) ``uint8`` array into a contiguous (3, H, W) ``uint8`` tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def mask_to_tensor(mask: np.ndarray) -> torch.Tensor:
    """Turn an encoded (H, W) mask into an ``int64`` tensor."""
    return torch.from_numpy(mask.astype(np.int64))


def _open(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except _PIL_ERRORS as err:
        raise DataError(f"{path}: cannot read as an image ({err})") from err


def _read_header(path: Path) -> tuple[str, tuple[int, int]]:
    with _open(path) as image:
        return image.mode, image.size


def read_rgb_file(path: Path) -> np.ndarray:
    """Read an RGB image file into a ``uint8`` (H, W, 3) array, raising ``DataError`` if unreadable."""
    with _open(path) as image:
        return decode_rgb(image, str(path))


def read_mask_file(path: Path) -> np.ndarray:
    """Read a single-channel mask file into an (H, W) array, raising ``DataError`` if unreadable."""
    with _open(path) as mask:
        return decode_mask(mask, str(path))


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise MissingFileError(f"{what} not found: {path} is not a directory")
    return path


def detect_layout(root: str | Path) -> str:
    """``"mmseg"`` for a root holding ``img_dir/``, ``"official"`` otherwise (also for a root that does not exist).

    Raises:
        DataError: If the root holds both layouts (``img_dir/`` beside ``Train/``, ``Val/`` or ``Test/``).
    """
    root = Path(root)
    if not (root / MMSEG_IMAGE_DIR).is_dir():
        return "official"
    official = [split for split in SPLITS if (root / split).is_dir()]
    if official:
        raise DataError(f"{root} holds both LoveDA layouts: the official {', '.join(official)}/ and mmseg's "
                        f"{MMSEG_IMAGE_DIR}/; point data.root at a folder holding one of them")
    return "mmseg"


@dataclass(frozen=True)
class _Sample:
    name: str
    image: Path
    mask: Path | None


class LoveDA(Dataset):
    """LoveDA tiles with masks encoded as training labels (0..6, 255 for no-data).

    Each item is ``{"image": uint8[3, H, W], "mask": int64[H, W], "name": "<Scene>/<file>"}``
    (``"<file>"`` in the mmseg layout, which has no scene folders); the Test split has hidden
    labels, so its items carry no ``"mask"``. Label values are validated every time a mask is
    loaded. Samples are in scene order (Urban, Rural), then by file name; by file name in the
    mmseg layout.

    Args:
        root: The LoveDA root: holding ``Train``, ``Val`` and ``Test`` (official layout) or
            ``img_dir`` and ``ann_dir`` (mmseg's converter), see the module docstring.
        split: ``"Train"``, ``"Val"`` or ``"Test"`` (in the mmseg layout, the folders ``train``,
            ``val`` and ``test``).
        scenes: ``"urban"``, ``"rural"`` or ``"both"`` (only ``"both"`` in the mmseg layout).
        check_labels: Also decode every mask up front and validate its values.

    Attributes:
        layout: ``"official"`` or ``"mmseg"``, as detected from ``root``.

    Raises:
        ConfigError: If ``split`` or ``scenes`` is not one of the allowed values, or ``scenes`` is
            not ``"both"`` in the mmseg layout.
        MissingFileError: If a directory or a Train/Val mask is missing.
        DataError: If the root holds both layouts, an image folder is empty or a file is
            unreadable, not RGB (images), not single-channel (masks), of mismatched size, or
            (with ``check_labels``) holds values outside 0..7.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        scenes: str = "both",
        check_labels: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ConfigError(f"LoveDA split {split!r} is unknown; expected one of {list(SPLITS)}")
        if scenes not in SCENES:
            raise ConfigError(f"LoveDA scenes {scenes!r} is unknown; expected one of {list(SCENES)}")
        self.root = Path(root)
        self.split = split
        self.scenes = scenes
        self.has_masks = split != "Test"
        self.layout = detect_layout(self.root)
        if self.layout == "mmseg" and scenes != "both":
            raise ConfigError(f"{self.root} is in mmseg's LoveDA layout ({MMSEG_IMAGE_DIR}/, {MMSEG_MASK_DIR}/), "
                              f"whose folders mix Urban and Rural tiles: scenes {scenes!r} cannot be selected; "
                              "use 'both' (data.scenes / --scenes)")
        self.samples = self._find_samples() if self.layout == "official" else self._find_mmseg_samples()
        self._check_all_headers()
        if check_labels:
            for sample in self.samples:
                self._load_mask(sample)

    def _find_samples(self) -> list[_Sample]:
        split_dir = _require_dir(_require_dir(self.root, "LoveDA root") / self.split, "LoveDA split")
        samples: list[_Sample] = []
        for scene in SCENES[self.scenes]:
            scene_dir = _require_dir(split_dir / scene, "LoveDA scene")
            image_dir = _require_dir(scene_dir / IMAGE_DIR, "LoveDA image directory")
            images = sorted((p for p in image_dir.glob("*.png") if p.is_file()), key=lambda p: p.name)
            if not images:
                raise DataError(f"{image_dir}: no .png images found")
            samples += [_Sample(f"{scene}/{image.name}", image, scene_dir / MASK_DIR / image.name if self.has_masks
                                else None) for image in images]
        self._raise_missing_masks(samples)
        return samples

    def _find_mmseg_samples(self) -> list[_Sample]:
        folder = MMSEG_SPLITS[self.split]
        root = _require_dir(self.root, "LoveDA root")
        image_dir = _require_dir(root / MMSEG_IMAGE_DIR / folder, f"LoveDA {self.split} image directory (mmseg layout)")
        mask_dir = _require_dir(root / MMSEG_MASK_DIR / folder,
                                f"LoveDA {self.split} mask directory (mmseg layout)") if self.has_masks else None
        images = sorted((p for p in image_dir.glob("*.png") if p.is_file()), key=lambda p: p.name)
        if not images:
            raise DataError(f"{image_dir}: no .png images found")
        samples = [_Sample(image.name, image, None if mask_dir is None else mask_dir / image.name) for image in images]
        self._raise_missing_masks(samples)
        return samples

    def _raise_missing_masks(self, samples: list[_Sample]) -> None:
        missing = [f"{s.image} (expected mask {s.mask})" for s in samples
                   if s.mask is not None and not s.mask.is_file()]
        if missing:
            listed = "; ".join(missing[:_MAX_LISTED_FILES])
            more = f"; and {len(missing) - _MAX_LISTED_FILES} more" if len(missing) > _MAX_LISTED_FILES else ""
            raise MissingFileError(f"{len(missing)} LoveDA {self.split} image(s) have no mask: {listed}{more}")

    def _check_all_headers(self) -> None:
        # Every file is checked before raising: an interrupted copy leaves many empty files, not one.
        problems: list[DataError] = []
        for sample in self.samples:
            try:
                self._check_headers(sample)
            except DataError as err:
                problems.append(err)
        if len(problems) == 1:
            raise problems[0]
        if problems:
            listed = "; ".join(str(p) for p in problems[:_MAX_LISTED_FILES])
            more = f"; and {len(problems) - _MAX_LISTED_FILES} more" if len(problems) > _MAX_LISTED_FILES else ""
            raise DataError(f"{len(problems)} LoveDA {self.split} samples have unreadable or mismatched files: "
                            f"{listed}{more}")

    @staticmethod
    def _check_headers(sample: _Sample) -> None:
        image_mode, image_size = _read_header(sample.image)
        check_image_mode(image_mode, str(sample.image))
        if sample.mask is None:
            return
        mask_mode, mask_size = _read_header(sample.mask)
        check_mask_mode(mask_mode, str(sample.mask))
        if image_size != mask_size:
            raise DataError(
                f"image {sample.image} is {image_size[0]}x{image_size[1]} but its mask {sample.mask} "
                f"is {mask_size[0]}x{mask_size[1]} (width x height); they must match"
            )

    @staticmethod
    def _load_mask(sample: _Sample) -> np.ndarray:
        return encode_loveda_mask(read_mask_file(sample.mask), str(sample.mask))

    def validation_scope(self) -> str:
        """The cache scope of :func:`~mapsage_ds.data.validation.validate_dataset`: layout, resolved root, split."""
        kind = "loveda" if self.layout == "official" else "loveda-mmseg"
        return f"{kind} {self.root.resolve()} {self.split}"

    def check_items(self) -> list[CheckItem]:
        """Every image and mask file, keyed by its path under the root and stamped with its size and mtime."""
        items = []
        for sample in self.samples:
            files = [(sample.image, lambda s=sample: read_rgb_file(s.image))]
            if sample.mask is not None:
                files.append((sample.mask, lambda s=sample: self._load_mask(s)))
            items += [CheckItem(key=path.relative_to(self.root).as_posix(), stamp=file_stamp(path),
                                source=str(path), check=check) for path, check in files]
        return items

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        sample = self.samples[index]
        item: dict[str, torch.Tensor | str] = {
            "image": image_to_tensor(read_rgb_file(sample.image)),
            "name": sample.name,
        }
        if sample.mask is not None:
            item["mask"] = mask_to_tensor(self._load_mask(sample))
        return item

    def __repr__(self) -> str:
        return (f"LoveDA(root={str(self.root)!r}, split={self.split!r}, scenes={self.scenes!r}, "
                f"layout={self.layout!r}, n={len(self)})")
