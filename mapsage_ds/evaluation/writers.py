"""Write predictions for a set of images: benchmark label PNGs, colour masks, overlays.

Label PNGs follow the LoveDA online benchmark (as the dataset authors' predict script writes
them): one single-channel ``uint8`` PNG per image, the image's file name, pixel value = class
index 0..6 (background 0, building 1, road 2, water 3, barren 4, forest 5, agriculture 6).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from mapsage_ds.data.loaders import eval_shard
from mapsage_ds.data.loveda import image_to_tensor, read_rgb_file
from mapsage_ds.errors import ConfigError, DataError, MissingFileError
from mapsage_ds.evaluation.predictor import Ensemble, Predictor, eval_mode
from mapsage_ds.evaluation.report import colorize, overlay, save_label_png

__all__ = ["OUTPUT_KINDS", "ImageFolder", "output_file_name", "write_predictions"]

OUTPUT_KINDS = ("labels", "color", "overlay")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


class ImageFolder(Dataset):
    """RGB images of one folder (not recursive), sorted by name, or the given files: items ``{"image", "name"}``.

    Args:
        folder: The folder (ignored when ``files`` is given).
        files: Image files to take as they are, in order (e.g. the plain images of ``--input``).

    Raises:
        MissingFileError: If the folder or a file does not exist.
        DataError: If there is no image.
    """

    def __init__(self, folder: str | Path | None = None, *, files: list[Path] | None = None) -> None:
        if files is not None:
            self.folder = None
            self.files = [Path(p) for p in files]
            missing = [p for p in self.files if not p.is_file()]
            if missing:
                raise MissingFileError(f"image not found: {missing[0]}")
            if not self.files:
                raise DataError("no images given")
            return
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise MissingFileError(f"image folder not found: {self.folder}")
        self.files = sorted(p for p in self.folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
        if not self.files:
            raise DataError(f"{self.folder}: no images ({', '.join(_IMAGE_SUFFIXES)})")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path = self.files[index]
        return {"image": image_to_tensor(read_rgb_file(path)), "name": path.name}


def output_file_name(name: str) -> str:
    """Output file name of an item: its image file name (scene folders dropped), as PNG."""
    return Path(name).with_suffix(".png").name


def check_distinct_outputs(inputs: Sequence, output_name: Callable[[Any], str]) -> None:
    """Refuse inputs that would be written to one output file (images of two scene folders, say).

    Raises:
        DataError: Naming both inputs and the shared output name.
    """
    seen: dict[str, Any] = {}
    for item in inputs:
        out = output_name(item)
        if out in seen:
            raise DataError(f"inputs {str(seen[out])!r} and {str(item)!r} would both be written as {out}; "
                            "predict them into separate output directories")
        seen[out] = item


@torch.no_grad()
def write_predictions(
    predictor: Predictor | Ensemble,
    dataset: Dataset,
    out_dir: str | Path,
    *,
    names: Sequence[str],
    device: torch.device,
    rank: int,
    world_size: int,
    kinds: Sequence[str] = OUTPUT_KINDS,
    refiner=None,
    progress: bool = True,
) -> list[Path]:
    """Predict this rank's shard of ``dataset`` and write the requested outputs.

    Writes ``out_dir/labels/NAME.png`` (benchmark format), ``out_dir/color/NAME.png`` (palette
    colours) and ``out_dir/overlay/NAME.png`` (colours blended over the image), as ``kinds``
    asks. No collective runs here: each rank writes its own files.

    Args:
        predictor: Fed with raw ``uint8`` images, one at a time (sizes may differ).
        dataset: Items ``{"image": uint8 [3, H, W], "name": str}``.
        out_dir: Output root.
        names: Every item's name, in order (checked for clashing output names up front).
        device: This rank's device.
        rank: This rank.
        world_size: Number of ranks.
        kinds: Any of ``labels``, ``color``, ``overlay``.
        refiner: Optional refinement (e.g. ``SamRefiner``) applied to the probabilities.
        progress: Show a progress bar of this rank's shard.

    Returns:
        The label files (or first requested kind) written by this rank.
    """
    unknown = [k for k in kinds if k not in OUTPUT_KINDS]
    if unknown or not kinds:
        raise ConfigError(f"outputs {list(kinds)}: expected one or more of {', '.join(OUTPUT_KINDS)}")
    check_distinct_outputs(names, output_file_name)
    out_dir = Path(out_dir)
    for kind in kinds:
        (out_dir / kind).mkdir(parents=True, exist_ok=True)
    written = []
    indices = eval_shard(len(dataset), rank=rank, world_size=world_size)
    with eval_mode(predictor):
        for index in tqdm(indices, desc=f"predict (rank {rank})", disable=not progress, unit="image"):
            sample = dataset[index]
            image = sample["image"].unsqueeze(0).to(device)
            if refiner is None:
                labels = predictor.predict(image)
            else:
                labels = refiner.refine(image, predictor.probabilities(image))
            labels = labels[0].cpu().numpy().astype(np.uint8)
            file_name = output_file_name(sample["name"])
            paths = {kind: out_dir / kind / file_name for kind in kinds}
            if "labels" in paths:
                save_label_png(labels, paths["labels"])
            if "color" in paths:
                Image.fromarray(colorize(labels)).save(paths["color"])
            if "overlay" in paths:
                picture = sample["image"].permute(1, 2, 0).numpy()
                Image.fromarray(overlay(picture, labels)).save(paths["overlay"])
            written.append(paths[kinds[0]])
    return written
