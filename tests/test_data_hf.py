"""Tests of the local Hugging Face ``datasets`` source against the LoveDA folder reader."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import random_pair, small_tree
from datasets import Dataset, DatasetDict, Features, Value
from datasets import Image as HFImage
from PIL import Image

from mapsage_ds.data import HFSegmentationDataset, LoveDA
from mapsage_ds.errors import ConfigError, DataError, MissingFileError

FEATURES = Features({"image": HFImage(), "mask": HFImage(), "name": Value("string")})


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_tree(tmp_path_factory.mktemp("hf") / "tree")


def _rows(dataset: LoveDA, embed: bool) -> dict[str, list]:
    """Image/mask columns of a LoveDA split, as file paths or as embedded PNG bytes."""

    def cell(path: Path) -> str | dict:
        return {"bytes": path.read_bytes(), "path": None} if embed else str(path)

    return {
        "image": [cell(s.image) for s in dataset.samples],
        "mask": [cell(s.mask) for s in dataset.samples],
        "name": [s.name for s in dataset.samples],
    }


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _assert_same_items(hf: HFSegmentationDataset, reference: LoveDA) -> None:
    assert len(hf) == len(reference)
    for i in range(len(reference)):
        got, want = hf[i], reference[i]
        assert got["name"] == want["name"]
        assert got["image"].dtype == torch.uint8 and got["mask"].dtype == torch.int64
        assert torch.equal(got["image"], want["image"])
        assert torch.equal(got["mask"], want["mask"])


@pytest.fixture(scope="module")
def saved_dict(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    splits = {"train": LoveDA(tree, "Train"), "validation": LoveDA(tree, "Val")}
    data = DatasetDict({k: Dataset.from_dict(_rows(v, embed=False), features=FEATURES) for k, v in splits.items()})
    path = tmp_path_factory.mktemp("hf") / "saved"
    data.save_to_disk(str(path))
    return path


@pytest.mark.parametrize(("split", "loveda_split"), [("train", "Train"), ("validation", "Val")])
def test_save_to_disk_matches_loveda(saved_dict: Path, tree: Path, split: str, loveda_split: str) -> None:
    hf = HFSegmentationDataset(saved_dict, split=split)
    assert hf.has_masks
    _assert_same_items(hf, LoveDA(tree, loveda_split))


def test_parquet_file_and_directory_match_loveda(tree: Path, tmp_path: Path) -> None:
    reference = LoveDA(tree, "Train")
    data = Dataset.from_dict(_rows(reference, embed=True), features=FEATURES)
    data.to_parquet(str(tmp_path / "train.parquet"))
    _assert_same_items(HFSegmentationDataset(tmp_path / "train.parquet", cache_dir=tmp_path / "cache"), reference)

    shards = tmp_path / "shards"
    shards.mkdir()
    half = len(data) // 2
    data.select(range(half)).to_parquet(str(shards / "part-0.parquet"))
    data.select(range(half, len(data))).to_parquet(str(shards / "part-1.parquet"))
    _assert_same_items(HFSegmentationDataset(shards, split="train", cache_dir=tmp_path / "cache"), reference)


def test_binary_columns_and_index_masks(tmp_path: Path) -> None:
    pairs = [random_pair(size=16, seed=s) for s in range(3)]
    encoded = [np.where(raw == 0, 255, raw - 1).astype(np.uint8) for _, raw in pairs]
    Dataset.from_dict(
        {"rgb": [_png_bytes(img) for img, _ in pairs], "label": [_png_bytes(m) for m in encoded]},
        features=Features({"rgb": Value("binary"), "label": Value("binary")}),
    ).save_to_disk(str(tmp_path / "single"))
    hf = HFSegmentationDataset(tmp_path / "single", image_column="rgb", mask_column="label", mask_encoding="index")
    for i, (image, _) in enumerate(pairs):
        item = hf[i]
        assert item["name"] == f"{i:06d}"
        np.testing.assert_array_equal(item["image"].numpy(), image.transpose(2, 0, 1))
        np.testing.assert_array_equal(item["mask"].numpy(), encoded[i])

    images_only = HFSegmentationDataset(tmp_path / "single", image_column="rgb", mask_column=None)
    assert not images_only.has_masks and set(images_only[0]) == {"image", "name"}


def _single_row_dataset(path: Path, image: np.ndarray, mask: np.ndarray, rows: int = 1) -> Path:
    columns = {"image": [_png_bytes(image)] * rows, "mask": [_png_bytes(mask)] * rows}
    Dataset.from_dict(columns, features=Features({"image": HFImage(), "mask": HFImage()})).save_to_disk(str(path))
    return path


def test_bad_index_mask_value(tmp_path: Path) -> None:
    image, raw = random_pair(size=16)
    raw[0, 0] = 7  # valid raw LoveDA, but not a valid training index
    path = _single_row_dataset(tmp_path / "d", image, raw, rows=2)
    assert HFSegmentationDataset(path, mask_encoding="loveda_raw")[1]["mask"][0, 0] == 6
    with pytest.raises(DataError, match=r"row 1 column 'mask'.*\[7"):
        HFSegmentationDataset(path, mask_encoding="index")[1]


def test_raw_label_out_of_range(tmp_path: Path) -> None:
    image, raw = random_pair(size=16)
    raw[2, 2] = 9
    with pytest.raises(DataError, match=r"row 0 column 'mask'.*\[9\]"):
        HFSegmentationDataset(_single_row_dataset(tmp_path / "d", image, raw))[0]


def test_size_mismatch_names_row(tmp_path: Path) -> None:
    image, _ = random_pair(size=16)
    _, raw = random_pair(size=12)
    with pytest.raises(DataError, match=r"row 0: image is 16x16 but mask is 12x12"):
        HFSegmentationDataset(_single_row_dataset(tmp_path / "d", image, raw))[0]


def test_rgb_mask_rejected(tmp_path: Path) -> None:
    image, _ = random_pair(size=16)
    with pytest.raises(DataError, match=r"row 0 column 'mask'.*single-channel class indices"):
        HFSegmentationDataset(_single_row_dataset(tmp_path / "d", image, image))[0]


def test_missing_column(saved_dict: Path) -> None:
    with pytest.raises(ConfigError, match=r"column 'label' not found.*\['image', 'mask', 'name'\]"):
        HFSegmentationDataset(saved_dict, split="train", mask_column="label")


def test_unknown_or_missing_split(saved_dict: Path) -> None:
    with pytest.raises(ConfigError, match=r"'test' not found.*\['train', 'validation'\]"):
        HFSegmentationDataset(saved_dict, split="test")
    with pytest.raises(ConfigError, match=r"None not found.*\['train', 'validation'\]"):
        HFSegmentationDataset(saved_dict)


def test_split_for_single_dataset(tmp_path: Path) -> None:
    image, raw = random_pair(size=16)
    path = _single_row_dataset(tmp_path / "d", image, raw)
    with pytest.raises(ConfigError, match="single dataset"):
        HFSegmentationDataset(path, split="train")


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="nowhere"):
        HFSegmentationDataset(tmp_path / "nowhere")


def test_unsupported_path_kinds(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match=r"data\.csv.*\.parquet"):
        HFSegmentationDataset(tmp_path / "data.csv")
    with pytest.raises(ConfigError, match="neither a save_to_disk directory"):
        HFSegmentationDataset(tmp_path)


def test_unknown_mask_encoding(saved_dict: Path) -> None:
    with pytest.raises(ConfigError, match=r"'palette'.*loveda_raw"):
        HFSegmentationDataset(saved_dict, split="train", mask_encoding="palette")


def test_referenced_file_missing(tmp_path: Path) -> None:
    image, raw = random_pair(size=16)
    files = {}
    for column, array in (("image", image), ("mask", raw)):
        files[column] = tmp_path / f"{column}.png"
        Image.fromarray(array).save(files[column])
    features = Features({"image": HFImage(), "mask": HFImage()})
    refs = Dataset.from_dict({k: [str(v)] for k, v in files.items()}, features=features)
    refs.to_parquet(str(tmp_path / "refs.parquet"))
    dataset = HFSegmentationDataset(tmp_path / "refs.parquet", cache_dir=tmp_path / "cache")
    assert dataset[0]["mask"].shape == (16, 16)
    files["mask"].unlink()
    with pytest.raises(MissingFileError, match=r"row 0 column 'mask'.*mask\.png"):
        dataset[0]
