"""Synthetic LoveDA-format trees of real PNG files, for demos and tests.

Each class has its own shape and a colour/texture that is recognisable within a ~16 px
neighbourhood, so a tiny model can learn the task in minutes on a CPU; Gaussian noise and
per-tile brightness changes keep it from being trivial. Masks hold RAW LoveDA values
(0 = no-data, 1..7 = classes), exactly like the real dataset, so the whole label path is tested.
A marker file written last records the spec; a tree without it is never overwritten.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image

from mapsage_ds.data.loveda import IMAGE_DIR, MASK_DIR, SPLITS
from mapsage_ds.errors import ConfigError, MissingFileError

MARKER_NAME = ".mapsage_synthetic.json"
SCENE_DIRS: tuple[str, ...] = ("Urban", "Rural")

# Raw LoveDA mask values.
NODATA, BACKGROUND, BUILDING, ROAD, WATER, BARREN, FOREST, AGRICULTURE = range(8)

_MIN_SIZE = 64
# Object sizes are in pixels, not fractions of the tile: LoveDA has a fixed ground resolution.
_ROAD_WIDTH = (10.0, 16.0)
_BUILDING_SIDE = (14, 36)
_FIELD_SIDE = (56, 140)
_BLOB_CELL = 48  # approximate blob diameter of the smooth random fields
_PIXEL_NOISE = 8.0
_BRIGHTNESS = (0.85, 1.15)

# Per scene: object counts (low, high) and, for the blob classes, area fractions (low, high).
_COUNTS = {
    "Urban": {"fields": (0, 2), "roads": (2, 4), "buildings": (10, 24)},
    "Rural": {"fields": (2, 4), "roads": (1, 2), "buildings": (2, 8)},
}
_BLOB_FRACTIONS = {
    "Urban": {BARREN: (0.06, 0.12), FOREST: (0.05, 0.15), WATER: (0.04, 0.10)},
    "Rural": {BARREN: (0.06, 0.14), FOREST: (0.10, 0.25), WATER: (0.06, 0.14)},
}

_WATER_RGB = (35.0, 75.0, 150.0)
_BACKGROUND_RGB = (122.0, 124.0, 128.0)
_ROAD_RGB = (62.0, 62.0, 68.0)
_BARREN_RGB = (172.0, 130.0, 88.0)
_FOREST_RGB = (40.0, 108.0, 45.0)
_CROP_RGB = ((188.0, 196.0, 96.0), (122.0, 158.0, 58.0))
_ROOF_RGB = ((214.0, 84.0, 62.0), (232.0, 128.0, 72.0), (196.0, 62.0, 52.0))


@dataclass(frozen=True)
class SyntheticSpec:
    """What synthetic tree to generate.

    Attributes:
        size: Side of every square tile in pixels.
        train_per_scene: Tiles per scene (Urban, Rural) in Train.
        val_per_scene: Tiles per scene in Val.
        test_per_scene: Tiles per scene in Test.
        nodata_fraction: Fraction of the tiles of each split and scene that hold a no-data patch.
        seed: Seed of the random generator; the tree is a pure function of the spec.
    """

    size: int = 256
    train_per_scene: int = 24
    val_per_scene: int = 8
    test_per_scene: int = 4
    nodata_fraction: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size < _MIN_SIZE:
            raise ConfigError(f"SyntheticSpec.size={self.size}; expected at least {_MIN_SIZE} pixels")
        for name in ("train_per_scene", "val_per_scene", "test_per_scene"):
            if getattr(self, name) < 1:
                raise ConfigError(f"SyntheticSpec.{name}={getattr(self, name)}; expected at least 1 tile")
        if not 0.0 <= self.nodata_fraction <= 1.0:
            raise ConfigError(f"SyntheticSpec.nodata_fraction={self.nodata_fraction}; expected a value in [0, 1]")

    def per_scene(self, split: str) -> int:
        """Number of tiles per scene in ``split`` (``"Train"``, ``"Val"`` or ``"Test"``)."""
        return {"Train": self.train_per_scene, "Val": self.val_per_scene, "Test": self.test_per_scene}[split]


def _layout(spec: SyntheticSpec) -> Iterator[tuple[str, str, list[str]]]:
    """Yield (split, scene, file names), numbering files across the whole tree like LoveDA does."""
    k = 0
    for split in SPLITS:
        for scene in SCENE_DIRS:
            n = spec.per_scene(split)
            yield split, scene, [f"{i}.png" for i in range(k, k + n)]
            k += n


def write_loveda_sample(
    root: str | Path,
    split: str,
    scene: str,
    name: str,
    image: np.ndarray,
    raw_mask: np.ndarray | None,
) -> Path:
    """Write one image (and optionally its mask) as PNG files in the LoveDA layout.

    The arrays are written as given (tests use this to build broken trees on purpose):
    ``uint8`` (H, W, 3) becomes an RGB PNG and ``uint8`` (H, W) a mode ``"L"`` PNG.

    Args:
        root: The tree root.
        split: Split folder, e.g. ``"Train"``.
        scene: Scene folder, e.g. ``"Urban"``.
        name: File name ending in ``.png``, shared by image and mask.
        image: The image array.
        raw_mask: The raw LoveDA mask array, or None to write no mask.

    Returns:
        The path of the written image.

    Raises:
        ConfigError: If ``name`` does not end in ``.png``.
    """
    if not name.endswith(".png"):
        raise ConfigError(f"sample name {name!r} must end in '.png' (LoveDA reads only .png files)")
    scene_dir = Path(root) / split / scene
    pairs = [(IMAGE_DIR, image)] + ([] if raw_mask is None else [(MASK_DIR, raw_mask)])
    for folder, array in pairs:
        (scene_dir / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(scene_dir / folder / name, compress_level=1)
    return scene_dir / IMAGE_DIR / name


def _smooth_field(rng: np.random.Generator, size: int) -> np.ndarray:
    cells = max(2, round(size / _BLOB_CELL)) + 1
    low = rng.random((cells, cells), dtype=np.float32)
    return np.asarray(Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC))


def _top_fraction(field: np.ndarray, fraction: float) -> np.ndarray:
    return field > np.quantile(field, 1.0 - fraction)


def _random_box(rng: np.random.Generator, size: int, side: tuple[int, int]) -> tuple[slice, slice]:
    h, w = np.minimum(rng.integers(side[0], side[1] + 1, size=2), size)
    y, x = rng.integers(-h // 4, size - 3 * h // 4), rng.integers(-w // 4, size - 3 * w // 4)
    return slice(max(y, 0), y + h), slice(max(x, 0), x + w)


def _road(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    # Mostly axis-aligned, like a street grid, with the odd diagonal.
    angle = rng.choice([0.0, np.pi / 2]) if rng.random() < 0.7 else rng.uniform(0.0, np.pi)
    y0, x0 = rng.uniform(0.15 * size, 0.85 * size, size=2)
    distance = np.abs((xx - x0) * np.sin(angle) - (yy - y0) * np.cos(angle))
    return distance < rng.uniform(*_ROAD_WIDTH) / 2


def _river(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    centre = rng.uniform(0.2, 0.8) * size + rng.uniform(0.05, 0.15) * size * np.sin(
        xx * rng.uniform(1.0, 3.0) * np.pi / size + rng.uniform(0.0, 2 * np.pi)
    )
    return np.abs(yy - centre) < rng.uniform(8.0, 16.0)


def _nodata_patch(rng: np.random.Generator, size: int) -> tuple[slice, slice]:
    # Real LoveDA no-data sits in strips along tile edges.
    depth = int(rng.uniform(0.08, 0.25) * size)
    length = int(rng.uniform(0.5, 1.0) * size)
    start = int(rng.integers(0, size - length + 1))
    along = slice(start, start + length)
    edge = rng.integers(4)
    across = slice(0, depth) if edge < 2 else slice(size - depth, size)
    return (across, along) if edge % 2 == 0 else (along, across)


def _labels(rng: np.random.Generator, size: int, scene: str, nodata: bool) -> tuple[np.ndarray, list]:
    """Draw a raw mask, layer by layer, and the agriculture fields drawn into it."""
    counts = _COUNTS[scene]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    raw = np.full((size, size), BACKGROUND, dtype=np.uint8)
    fields_drawn = []
    for _ in range(rng.integers(counts["fields"][0], counts["fields"][1] + 1)):
        box = _random_box(rng, size, _FIELD_SIDE)
        raw[box] = AGRICULTURE
        fields_drawn.append((box, rng.uniform(0.0, np.pi), rng.uniform(6.0, 11.0)))
    for cls, fraction in _BLOB_FRACTIONS[scene].items():
        raw[_top_fraction(_smooth_field(rng, size), rng.uniform(*fraction))] = cls
    if rng.random() < 0.35:
        raw[_river(rng, yy, xx, size)] = WATER
    for _ in range(rng.integers(counts["roads"][0], counts["roads"][1] + 1)):
        raw[_road(rng, yy, xx, size)] = ROAD
    for _ in range(rng.integers(counts["buildings"][0], counts["buildings"][1] + 1)):
        raw[_random_box(rng, size, _BUILDING_SIDE)] = BUILDING
    if nodata:
        raw[_nodata_patch(rng, size)] = NODATA
    return raw, fields_drawn


def _gauss(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    return sigma * rng.standard_normal(shape, dtype=np.float32)


def _crop_stripes(size: int, fields_drawn: list) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    stripes = np.zeros((size, size, 3), dtype=np.float32)
    for box, angle, period in fields_drawn:
        phase = (xx[box] * np.cos(angle) + yy[box] * np.sin(angle)) * (2 * np.pi / period)
        stripes[box] = np.where((np.sin(phase) > 0)[..., None], _CROP_RGB[0], _CROP_RGB[1])
    return stripes


def _textures(rng: np.random.Generator, raw: np.ndarray, fields_drawn: list) -> np.ndarray:
    """Paint every class with its own colour and texture, as a float (H, W, 3) image."""
    size = raw.shape[0]
    image = np.zeros((size, size, 3), dtype=np.float32)
    mottle = _smooth_field(rng, size) - 0.5
    where = {cls: raw == cls for cls in range(BACKGROUND, AGRICULTURE + 1)}
    n = {cls: int(mask.sum()) for cls, mask in where.items()}

    # Noise of shape (n, 1) varies brightness only; (n, 3) also varies hue (grainy soil).
    image[where[BACKGROUND]] = (
        np.float32(_BACKGROUND_RGB) + 30.0 * mottle[where[BACKGROUND], None] + _gauss(rng, (n[BACKGROUND], 1), 6.0)
    )
    image[where[WATER]] = np.float32(_WATER_RGB) + 8.0 * mottle[where[WATER], None]
    image[where[ROAD]] = np.float32(_ROAD_RGB) + _gauss(rng, (n[ROAD], 1), 3.0)
    image[where[BARREN]] = np.float32(_BARREN_RGB) + _gauss(rng, (n[BARREN], 3), 16.0)
    shade = np.where(rng.random((n[FOREST], 1)) < 0.25, np.float32(0.55), np.float32(1.1))
    image[where[FOREST]] = np.float32(_FOREST_RGB) * shade + _gauss(rng, (n[FOREST], 1), 6.0)
    image[where[AGRICULTURE]] = _crop_stripes(size, fields_drawn)[where[AGRICULTURE]]
    roof = np.float32(_ROOF_RGB[rng.integers(len(_ROOF_RGB))])
    image[where[BUILDING]] = roof + _gauss(rng, (n[BUILDING], 1), 4.0)
    return image


def _tile(rng: np.random.Generator, size: int, scene: str, nodata: bool) -> tuple[np.ndarray, np.ndarray]:
    raw, fields_drawn = _labels(rng, size, scene, nodata)
    image = _textures(rng, raw, fields_drawn)
    image *= rng.uniform(*_BRIGHTNESS)
    image += _gauss(rng, image.shape, _PIXEL_NOISE)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    image[raw == NODATA] = 0
    return image, raw


def generate_loveda_tree(root: str | Path, spec: SyntheticSpec) -> Path:
    """Write a synthetic LoveDA tree, then its marker file.

    Files go to ``{root}/{Train,Val,Test}/{Urban,Rural}/{images_png,masks_png}/{k}.png`` with
    ``k`` counting across the whole tree. Test gets masks too, so predictions can be scored;
    :class:`~mapsage_ds.data.loveda.LoveDA` ignores them for Test, as it must for real data.

    Args:
        root: Where to write the tree.
        spec: What to generate.

    Returns:
        The tree root.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    plan_seq, tiles_seq = np.random.SeedSequence(spec.seed).spawn(2)
    plan_rng = np.random.default_rng(plan_seq)
    layout = list(_layout(spec))
    tile_seqs = iter(tiles_seq.spawn(sum(len(names) for _, _, names in layout)))
    for split, scene, names in layout:
        with_nodata = plan_rng.permutation(len(names)) < round(spec.nodata_fraction * len(names))
        for name, nodata in zip(names, with_nodata):
            image, raw = _tile(np.random.default_rng(next(tile_seqs)), spec.size, scene, bool(nodata))
            write_loveda_sample(root, split, scene, name, image, raw)
    # Written last and atomically: its presence means the tree is complete.
    tmp = root / f"{MARKER_NAME}.tmp"
    tmp.write_text(json.dumps(asdict(spec), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, root / MARKER_NAME)
    return root


def _read_marker(marker: Path) -> dict:
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"synthetic-tree marker {marker} is unreadable ({err}); delete the tree to regenerate"
        ) from err
    if not isinstance(recorded, dict):
        raise ConfigError(f"synthetic-tree marker {marker} holds {type(recorded).__name__}; expected a JSON object")
    return recorded


def _check_complete(root: Path, spec: SyntheticSpec) -> None:
    for split, scene, names in _layout(spec):
        for folder in (IMAGE_DIR, MASK_DIR):
            for name in names:
                path = root / split / scene / folder / name
                if not path.is_file():
                    raise MissingFileError(
                        f"synthetic tree {root} is marked complete but {path} is missing; delete the tree to regenerate"
                    )


def ensure_synthetic_tree(root: str | Path, spec: SyntheticSpec) -> Path:
    """Generate the synthetic tree unless ``root`` already holds this exact one.

    Args:
        root: Where the tree lives or should be written.
        spec: What the tree must hold.

    Returns:
        The tree root.

    Raises:
        ConfigError: If ``root`` holds a synthetic tree of another spec, or is a file or a
            non-empty directory that is not a synthetic tree (it is never written into).
        MissingFileError: If a tree marked complete lacks one of its files.
    """
    root = Path(root)
    marker = root / MARKER_NAME
    if marker.is_file():
        recorded, wanted = _read_marker(marker), asdict(spec)
        if recorded != wanted:
            keys = [f.name for f in fields(SyntheticSpec)] + sorted(set(recorded) - set(wanted))
            diffs = [f"{k}: {recorded.get(k, '<absent>')!r} on disk vs {wanted.get(k, '<absent>')!r} requested"
                     for k in keys if recorded.get(k, "<absent>") != wanted.get(k, "<absent>")]
            raise ConfigError(
                f"synthetic tree {root} was generated with another spec (marker {marker}): {'; '.join(diffs)}. "
                "Use another root or delete this one"
            )
        _check_complete(root, spec)
        return root
    if root.exists() and not root.is_dir():
        raise ConfigError(f"synthetic tree root {root} is a file; expected a directory")
    if root.is_dir() and any(root.iterdir()):
        raise ConfigError(
            f"refusing to write a synthetic tree into {root}: it is not empty and has no {MARKER_NAME} marker "
            "(not a synthetic tree, or an interrupted generation); use an empty or new directory"
        )
    return generate_loveda_tree(root, spec)
