"""Shared helpers for the data tests: tiny LoveDA trees of real PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mapsage_ds.data import SyntheticSpec, generate_loveda_tree, write_loveda_sample

# Every tile holds a no-data strip, so the 0 -> 255 mapping is exercised on every mask.
SMALL_SPEC = SyntheticSpec(size=64, train_per_scene=3, val_per_scene=2, test_per_scene=2, nodata_fraction=1.0, seed=1)


def small_tree(root: Path) -> Path:
    """Write the small synthetic tree under ``root`` and return it."""
    return generate_loveda_tree(root, SMALL_SPEC)


def read_png(path: Path) -> np.ndarray:
    """Read a PNG's stored values with PIL, independently of the code under test."""
    with Image.open(path) as image:
        return np.array(image)


def random_pair(size: int = 32, seed: int = 0, raw_max: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """A random RGB image and a raw LoveDA mask with values 0..raw_max."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    raw = rng.integers(0, raw_max + 1, (size, size), dtype=np.uint8)
    return image, raw


def write_pair(root: Path, split: str = "Train", scene: str = "Urban", name: str = "0.png", **kwargs) -> Path:
    """Write one random image/mask pair in the LoveDA layout and return the image path."""
    image, raw = random_pair(**kwargs)
    return write_loveda_sample(root, split, scene, name, image, raw)


def mask_path(image_path: Path) -> Path:
    """The mask path LoveDA expects for an image path."""
    return image_path.parent.parent / "masks_png" / image_path.name
