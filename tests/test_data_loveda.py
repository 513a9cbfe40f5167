"""Tests of the LoveDA folder reader and the raw-label encoding, on real PNG files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import SMALL_SPEC, mask_path, random_pair, read_png, small_tree, write_pair
from PIL import Image
from torch.utils.data import DataLoader

from mapsage_ds.data import IGNORE_INDEX, LoveDA, check_index_mask, encode_loveda_mask, write_loveda_sample
from mapsage_ds.errors import ConfigError, DataError, MissingFileError


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_tree(tmp_path_factory.mktemp("loveda") / "tree")


def _names(root: Path, split: str, scene: str) -> list[str]:
    return sorted(p.name for p in (root / split / scene / "images_png").glob("*.png"))


# --- encode_loveda_mask / check_index_mask -------------------------------------------------


def test_encode_known_answer() -> None:
    raw = np.array([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=np.uint8)
    expected = np.array([[255, 0, 1, 2], [3, 4, 5, 6]], dtype=np.uint8)
    np.testing.assert_array_equal(encode_loveda_mask(raw, "m.png"), expected)


def test_encode_accepts_16_bit_masks() -> None:
    raw = np.array([[0, 7]], dtype=np.uint16)
    np.testing.assert_array_equal(encode_loveda_mask(raw, "m.png"), [[255, 6]])


def test_encode_rejects_out_of_range_values_listing_them() -> None:
    raw = np.array([[1, 9, 200], [8, 0, 9]], dtype=np.uint8)
    with pytest.raises(DataError, match=r"tile_3\.png.*\[8, 9, 200\]"):
        encode_loveda_mask(raw, "tile_3.png")


def test_encode_rejects_colour_masks() -> None:
    with pytest.raises(DataError, match="single-channel class indices"):
        encode_loveda_mask(np.zeros((4, 4, 3), dtype=np.uint8), "rgb_mask.png")


def test_encode_rejects_float_masks() -> None:
    with pytest.raises(DataError, match="float_mask.*dtype"):
        encode_loveda_mask(np.zeros((4, 4), dtype=np.float32), "float_mask")


def test_check_index_mask() -> None:
    good = np.array([[0, 6, IGNORE_INDEX]], dtype=np.uint8)
    np.testing.assert_array_equal(check_index_mask(good, "ok"), good)
    with pytest.raises(DataError, match=r"row 5.*\[7\]"):
        check_index_mask(np.array([[0, 7]], dtype=np.uint8), "row 5")


# --- reading a tree --------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["Train", "Val"])
def test_labels_match_raw_png(tree: Path, split: str) -> None:
    dataset = LoveDA(tree, split, check_labels=True)
    saw_nodata = False
    for item in dataset:
        scene, name = item["name"].split("/")
        raw = read_png(tree / split / scene / "masks_png" / name).astype(np.int64)
        expected = np.where(raw == 0, 255, raw - 1)
        assert item["mask"].dtype == torch.int64
        np.testing.assert_array_equal(item["mask"].numpy(), expected)
        image = read_png(tree / split / scene / "images_png" / name)
        assert item["image"].dtype == torch.uint8
        np.testing.assert_array_equal(item["image"].numpy(), image.transpose(2, 0, 1))
        saw_nodata |= bool((raw == 0).any())
        assert set(np.unique(item["mask"].numpy())) <= {*range(7), 255}
    assert saw_nodata


@pytest.mark.parametrize(
    ("scenes", "expected"),
    [("urban", ["Urban"]), ("rural", ["Rural"]), ("both", ["Urban", "Rural"])],
)
def test_scene_selection_and_order(tree: Path, scenes: str, expected: list[str]) -> None:
    dataset = LoveDA(tree, "Train", scenes=scenes)
    assert len(dataset) == SMALL_SPEC.train_per_scene * len(expected)
    assert [item["name"] for item in dataset] == [
        f"{scene}/{name}" for scene in expected for name in _names(tree, "Train", scene)
    ]


def test_samples_sorted_by_scene_then_file_name(tmp_path: Path) -> None:
    for scene, names in (("Rural", ["b.png", "a.png"]), ("Urban", ["z.png", "10.png", "2.png"])):
        for seed, name in enumerate(names):
            write_pair(tmp_path, "Val", scene, name, seed=seed)
    dataset = LoveDA(tmp_path, "Val")
    expected = ["Urban/10.png", "Urban/2.png", "Urban/z.png", "Rural/a.png", "Rural/b.png"]
    assert [s.name for s in dataset.samples] == expected


def test_test_split_yields_images_only(tree: Path) -> None:
    dataset = LoveDA(tree, "Test")
    assert not dataset.has_masks
    assert len(dataset) == 2 * SMALL_SPEC.test_per_scene
    item = dataset[0]
    assert set(item) == {"image", "name"}
    assert LoveDA(tree, "Train").has_masks


def test_test_split_needs_no_mask_folder(tmp_path: Path) -> None:
    image, _ = random_pair()
    write_loveda_sample(tmp_path, "Test", "Rural", "5.png", image, None)
    dataset = LoveDA(tmp_path, "Test", scenes="rural")
    assert not (tmp_path / "Test" / "Rural" / "masks_png").exists()
    assert dataset[0]["name"] == "Rural/5.png"


def test_palette_index_mask_is_read_as_indices(tmp_path: Path) -> None:
    image, raw = random_pair(seed=3)
    image_path = write_loveda_sample(tmp_path, "Train", "Urban", "0.png", image, None)
    mask = Image.frombytes("P", raw.shape[::-1], raw.tobytes())
    mask.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    mask_file = mask_path(image_path)
    mask_file.parent.mkdir(parents=True)
    mask.save(mask_file)
    assert read_png(mask_file).ndim == 2 and Image.open(mask_file).mode == "P"
    item = LoveDA(tmp_path, "Train", scenes="urban")[0]
    np.testing.assert_array_equal(item["mask"].numpy(), np.where(raw == 0, 255, raw.astype(np.int64) - 1))


def test_dataloader_collates(tree: Path) -> None:
    batch = next(iter(DataLoader(LoveDA(tree, "Val"), batch_size=2)))
    size = SMALL_SPEC.size
    assert batch["image"].shape == (2, 3, size, size) and batch["image"].dtype == torch.uint8
    assert batch["mask"].shape == (2, size, size) and batch["mask"].dtype == torch.int64
    assert len(batch["name"]) == 2


# --- errors ----------------------------------------------------------------------------------


def test_bad_split_name(tree: Path) -> None:
    with pytest.raises(ConfigError, match=r"'train'.*Train"):
        LoveDA(tree, "train")


def test_bad_scenes(tree: Path) -> None:
    with pytest.raises(ConfigError, match=r"'Urban'.*urban"):
        LoveDA(tree, "Train", scenes="Urban")


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="no_such_root"):
        LoveDA(tmp_path / "no_such_root", "Train")


def test_missing_split_and_scene(tmp_path: Path) -> None:
    write_pair(tmp_path, "Train", "Urban")
    with pytest.raises(MissingFileError, match=re.escape(str(tmp_path / "Val"))):
        LoveDA(tmp_path, "Val")
    with pytest.raises(MissingFileError, match=re.escape(str(tmp_path / "Train" / "Rural"))):
        LoveDA(tmp_path, "Train", scenes="both")
    assert len(LoveDA(tmp_path, "Train", scenes="urban")) == 1


def test_missing_images_folder(tmp_path: Path) -> None:
    (tmp_path / "Train" / "Urban" / "masks_png").mkdir(parents=True)
    with pytest.raises(MissingFileError, match="images_png"):
        LoveDA(tmp_path, "Train", scenes="urban")


def test_empty_images_folder(tmp_path: Path) -> None:
    (tmp_path / "Train" / "Urban" / "images_png").mkdir(parents=True)
    with pytest.raises(DataError, match=r"images_png.*no \.png images"):
        LoveDA(tmp_path, "Train", scenes="urban")


def test_missing_mask(tmp_path: Path) -> None:
    write_pair(tmp_path, name="0.png")
    image_path = write_pair(tmp_path, name="17.png", seed=1)
    mask_path(image_path).unlink()
    with pytest.raises(MissingFileError, match=re.escape(str(image_path)) + r".*expected mask .*masks_png.17\.png"):
        LoveDA(tmp_path, "Train", scenes="urban")


def test_size_mismatch(tmp_path: Path) -> None:
    image, _ = random_pair(size=32)
    _, raw = random_pair(size=24)
    write_loveda_sample(tmp_path, "Train", "Urban", "3.png", image, raw)
    with pytest.raises(DataError, match=r"images_png.3\.png is 32x32 but its mask .*masks_png.3\.png is 24x24"):
        LoveDA(tmp_path, "Train", scenes="urban")


@pytest.mark.parametrize("folder", ["images_png", "masks_png"])
def test_corrupt_file(tmp_path: Path, folder: str) -> None:
    image_path = write_pair(tmp_path, name="8.png")
    broken = image_path if folder == "images_png" else mask_path(image_path)
    broken.write_bytes(b"this is not a png at all")
    with pytest.raises(DataError, match=re.escape(str(broken)) + ".*cannot read"):
        LoveDA(tmp_path, "Train", scenes="urban")


def test_truncated_png_fails_at_load(tmp_path: Path) -> None:
    image_path = write_pair(tmp_path, name="4.png", size=64)
    data = image_path.read_bytes()
    image_path.write_bytes(data[: len(data) // 2])  # header intact, pixel data cut short
    dataset = LoveDA(tmp_path, "Train", scenes="urban")
    with pytest.raises(DataError, match=re.escape(str(image_path)) + ".*cannot decode"):
        dataset[0]


def test_out_of_range_label(tmp_path: Path) -> None:
    image, raw = random_pair()
    raw[3, 5] = 9
    write_loveda_sample(tmp_path, "Train", "Rural", "9.png", image, raw)
    dataset = LoveDA(tmp_path, "Train", scenes="rural")
    expected = re.escape(str(tmp_path / "Train" / "Rural" / "masks_png" / "9.png")) + r".*\[9\]"
    with pytest.raises(DataError, match=expected):
        dataset[0]
    with pytest.raises(DataError, match=expected):
        LoveDA(tmp_path, "Train", scenes="rural", check_labels=True)


def test_rgb_mask_rejected(tmp_path: Path) -> None:
    image, _ = random_pair()
    write_loveda_sample(tmp_path, "Train", "Urban", "6.png", image, image)
    with pytest.raises(DataError, match=r"masks_png.6\.png.*'RGB'.*single-channel class indices"):
        LoveDA(tmp_path, "Train", scenes="urban")


def test_grey_image_rejected(tmp_path: Path) -> None:
    image, raw = random_pair()
    write_loveda_sample(tmp_path, "Train", "Urban", "2.png", image[..., 0], raw)
    with pytest.raises(DataError, match=r"images_png.2\.png.*'L'.*RGB"):
        LoveDA(tmp_path, "Train", scenes="urban")
