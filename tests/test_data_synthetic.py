"""Tests of the synthetic LoveDA-tree generator."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from data_helpers import SMALL_SPEC, random_pair, read_png
from PIL import Image

from mapsage_ds.data import LoveDA, SyntheticSpec, ensure_synthetic_tree, generate_loveda_tree, write_loveda_sample
from mapsage_ds.data.synthetic import MARKER_NAME
from mapsage_ds.errors import ConfigError, MissingFileError


@pytest.fixture(scope="module")
def default_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic_tree(tmp_path_factory.mktemp("synthetic") / "tree", SyntheticSpec())


def _pngs(root: Path) -> list[Path]:
    return sorted(root.rglob("*.png"))


def _arrays(root: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(root)): read_png(p) for p in _pngs(root)}


def test_layout_and_formats(default_tree: Path) -> None:
    spec = SyntheticSpec()
    names = []
    for split in ("Train", "Val", "Test"):
        per_scene = spec.per_scene(split)
        for scene in ("Urban", "Rural"):
            images = sorted((default_tree / split / scene / "images_png").glob("*.png"))
            masks = sorted((default_tree / split / scene / "masks_png").glob("*.png"))
            assert len(images) == per_scene
            assert [p.name for p in masks] == [p.name for p in images]
            names += [p.name for p in images]
            with Image.open(images[0]) as image, Image.open(masks[0]) as mask:
                assert (image.mode, image.size) == ("RGB", (spec.size, spec.size))
                assert (mask.mode, mask.size) == ("L", (spec.size, spec.size))
    assert len(set(names)) == len(names) == 2 * (spec.train_per_scene + spec.val_per_scene + spec.test_per_scene)
    assert set(names) == {f"{k}.png" for k in range(len(names))}
    assert len(LoveDA(default_tree, "Train")) == 2 * spec.train_per_scene


def test_all_classes_and_nodata_present(default_tree: Path) -> None:
    counts = np.zeros(8, dtype=np.int64)
    tiles_with_nodata = 0
    for split in ("Train", "Val", "Test"):
        for mask_file in (default_tree / split).glob("*/masks_png/*.png"):
            raw = read_png(mask_file)
            counts += np.bincount(raw.ravel(), minlength=8)
            tiles_with_nodata += bool((raw == 0).any())
            if split == "Train":
                image = read_png(mask_file.parent.parent / "images_png" / mask_file.name)
                assert (image[raw == 0] == 0).all(), "no-data pixels must be black"
                assert image[raw != 0].mean() > 20
    fractions = counts / counts.sum()
    assert counts.size == 8 and (fractions > 0).all(), fractions
    assert fractions[4] > 0.03 and fractions[5] > 0.03, "water and barren must be well represented"
    assert fractions[1:].max() < 0.5, "no class may dominate"
    assert tiles_with_nodata == sum(round(0.3 * n) for n in (24, 24, 8, 8, 4, 4))


def test_marker_written_last(default_tree: Path) -> None:
    marker = default_tree / MARKER_NAME
    assert json.loads(marker.read_text()) == asdict(SyntheticSpec())
    assert marker.stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in _pngs(default_tree))
    assert not list(default_tree.glob("*.tmp"))


def test_deterministic(tmp_path: Path) -> None:
    first = _arrays(generate_loveda_tree(tmp_path / "a", SMALL_SPEC))
    second = _arrays(generate_loveda_tree(tmp_path / "b", SMALL_SPEC))
    assert first.keys() == second.keys()
    for key, array in first.items():
        assert array.tobytes() == second[key].tobytes(), key
    other = _arrays(generate_loveda_tree(tmp_path / "c", replace(SMALL_SPEC, seed=2)))
    assert any(array.tobytes() != other[key].tobytes() for key, array in first.items())


def test_nodata_fraction_zero_has_no_nodata(tmp_path: Path) -> None:
    root = generate_loveda_tree(tmp_path, replace(SMALL_SPEC, nodata_fraction=0.0))
    assert all((read_png(p) > 0).all() for p in root.rglob("masks_png/*.png"))


def test_second_ensure_is_cached(tmp_path: Path) -> None:
    root = ensure_synthetic_tree(tmp_path / "tree", SMALL_SPEC)
    before = {p: p.stat().st_mtime_ns for p in [*_pngs(root), root / MARKER_NAME]}
    assert ensure_synthetic_tree(tmp_path / "tree", SMALL_SPEC) == root
    assert {p: p.stat().st_mtime_ns for p in [*_pngs(root), root / MARKER_NAME]} == before


def test_spec_mismatch(tmp_path: Path) -> None:
    root = ensure_synthetic_tree(tmp_path / "tree", SMALL_SPEC)
    with pytest.raises(ConfigError, match=re.escape(MARKER_NAME) + r".*seed: 1 on disk vs 7 requested"):
        ensure_synthetic_tree(root, replace(SMALL_SPEC, seed=7))


def test_refuses_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a synthetic tree")
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path)) + ".*not empty"):
        ensure_synthetic_tree(tmp_path, SMALL_SPEC)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_refuses_file_root(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        ensure_synthetic_tree(tmp_path / "file", SMALL_SPEC)


def test_incomplete_marked_tree(tmp_path: Path) -> None:
    root = ensure_synthetic_tree(tmp_path / "tree", SMALL_SPEC)
    (root / "Val" / "Rural" / "masks_png" / "9.png").unlink()
    with pytest.raises(MissingFileError, match=r"Val.Rural.masks_png.9\.png"):
        ensure_synthetic_tree(root, SMALL_SPEC)


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"size": 16}, "size"), ({"val_per_scene": 0}, "val_per_scene"), ({"nodata_fraction": 1.5}, "nodata_fraction")],
)
def test_spec_validation(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"SyntheticSpec.{field}"):
        SyntheticSpec(**changes)


def test_write_loveda_sample(tmp_path: Path) -> None:
    image, raw = random_pair(size=16)
    image_path = write_loveda_sample(tmp_path, "Val", "Urban", "12.png", image, raw)
    assert image_path == tmp_path / "Val" / "Urban" / "images_png" / "12.png"
    np.testing.assert_array_equal(read_png(image_path), image)
    np.testing.assert_array_equal(read_png(tmp_path / "Val" / "Urban" / "masks_png" / "12.png"), raw)
    with pytest.raises(ConfigError, match="'12'"):
        write_loveda_sample(tmp_path, "Val", "Urban", "12", image, raw)
