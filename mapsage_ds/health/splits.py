"""Check 5: one source of splits, and no image shared between training data and val/test (by content hash)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from mapsage_ds.data.loveda import IMAGE_DIR, SCENES, SPLITS
from mapsage_ds.health.result import CheckResult, failed, passed, warned

OFFICIAL = {"train": "Train", "val": "Val", "test": "Test"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_LISTED = 5


def split_images(root: str | Path, split: str, scenes: str = "both") -> list[Path]:
    """Image files of a LoveDA split folder (``root/split/<scene>/images_png/*.png``), sorted; [] if absent."""
    files = []
    for scene in SCENES[scenes]:
        folder = Path(root) / split / scene / IMAGE_DIR
        if folder.is_dir():
            files += sorted(p for p in folder.glob("*.png") if p.is_file())
    return files


def image_files_under(folder: str | Path) -> list[Path]:
    """Every image file below ``folder`` (e.g. an EarthVQA image directory), sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def content_hash(path: str | Path) -> str:
    """Hash of the decoded RGB pixels and size: identical for a copy, also when re-encoded losslessly."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.asarray(pixels.shape, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def hash_files(paths: Iterable[str | Path]) -> dict[str, str]:
    """``{path: content hash}``; an unreadable file maps to ``"unreadable: <error>"``."""
    hashes = {}
    for path in paths:
        try:
            hashes[str(path)] = content_hash(path)
        except (OSError, SyntaxError, ValueError) as error:
            hashes[str(path)] = f"unreadable: {error}"
    return hashes


def check_split_folders(*, source: str, root: str | Path, train_split: str, val_split: str,
                        counts: Mapping[str, int]) -> CheckResult:
    """Training and validation read the official ``Train`` and ``Val`` folders, and those folders exist.

    Args:
        source: ``loveda`` (folder tree) or ``hf``.
        root: The data root.
        train_split: The split training reads.
        val_split: The split validation reads.
        counts: Images found per split folder.
    """
    name = "5.split_folders"
    figure = ", ".join(f"{split} {counts.get(split, 0)}" for split in SPLITS)
    if source != "loveda":
        return warned(name, f"source {source}", f"splits '{train_split}' / '{val_split}' of a {source} dataset: "
                      "their origin in the official folders cannot be verified here",
                      "check that the dataset was built from the official Train/Val/Test folders only")
    problems = []
    if train_split != OFFICIAL["train"]:
        problems.append(f"training reads '{train_split}', not the official '{OFFICIAL['train']}'")
    if val_split != OFFICIAL["val"]:
        problems.append(f"validation reads '{val_split}', not the official '{OFFICIAL['val']}'")
    problems += [f"{root}/{split} holds no images" for split in (train_split, val_split) if not counts.get(split)]
    extra = sorted(p.name for p in Path(root).iterdir() if p.is_dir() and p.name not in SPLITS) \
        if Path(root).is_dir() else []
    details = {"counts": dict(counts), "train_split": train_split, "val_split": val_split, "other_folders": extra}
    if problems:
        return failed(name, figure, "; ".join(problems),
                      "train on Train and validate on Val (data.train_split / data.val_split); Test is for the "
                      "online benchmark only", **details)
    note = f"; other folders under the root are not read: {extra}" if extra else ""
    return passed(name, figure, f"training reads {train_split}, validation {val_split}{note}", **details)


def check_split_leakage(train: Mapping[str, str], held_out: Mapping[str, Mapping[str, str]], *,
                        extra_train: Mapping[str, str] | None = None) -> CheckResult:
    """No training image (including an optional pretraining set) has the content of a val/test image.

    Args:
        train: ``{path: content hash}`` of the training split.
        held_out: ``{split name: {path: content hash}}`` of val and test.
        extra_train: ``{path: content hash}`` of other training data (e.g. EarthVQA images).
    """
    name = "5.split_leakage"
    training = {**train, **(extra_train or {})}
    unreadable = [p for p, h in [*training.items(), *(i for s in held_out.values() for i in s.items())]
                  if h.startswith("unreadable")]
    by_hash: dict[str, list[str]] = {}
    for path, digest in training.items():
        if not digest.startswith("unreadable"):
            by_hash.setdefault(digest, []).append(path)
    shared = [(path, split, by_hash[digest]) for split, files in held_out.items()
              for path, digest in files.items() if digest in by_hash]
    sizes = ", ".join(f"{split} {len(files)}" for split, files in held_out.items())
    figure = f"{len(training)} training images vs {sizes}: {len(shared)} shared"
    details = {"training_images": len(training), "extra_training_images": len(extra_train or {}),
               "held_out": {split: len(files) for split, files in held_out.items()},
               "shared": [{"held_out": p, "split": s, "training": t} for p, s, t in shared[:100]],
               "unreadable": unreadable[:50]}
    if not training or not any(held_out.values()):
        return failed(name, figure, "no images to compare: the training or the val/test folders are empty",
                      "check --data-root and the split folders (see 5.split_folders)", **details)
    if shared:
        listed = "; ".join(f"{split} {path} = {', '.join(train_paths[:2])}"
                           for path, split, train_paths in shared[:_LISTED])
        return failed(name, figure, f"{len(shared)} val/test image(s) also in training data: {listed}",
                      "remove these images from the training data (or the pretraining set): scores on val/test "
                      "would be inflated", **details)
    if unreadable:
        return failed(name, figure, f"{len(unreadable)} image(s) could not be hashed: {unreadable[:_LISTED]}",
                      "fix or remove the unreadable files (see preflight.data_files)", **details)
    return passed(name, figure, "no training image has the content of a val/test image", **details)


def count_split_images(root: str | Path, scenes: str = "both", splits: Sequence[str] = SPLITS) -> dict[str, int]:
    """Images per split folder."""
    return {split: len(split_images(root, split, scenes)) for split in splits}
