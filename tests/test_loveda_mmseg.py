"""The LoveDA layout mmsegmentation's converter leaves (img_dir/ann_dir): the same samples, validation, training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_run_config, write_config
from mapsage_ds.cli.finetune import main as finetune
from mapsage_ds.data.loveda import SPLITS, LoveDA, detect_layout
from mapsage_ds.data.validation import validate_dataset
from mapsage_ds.errors import ConfigError, DataError, MissingFileError


def mmseg_convert(official: Path, out: Path) -> Path:
    """What tools/dataset_converters/loveda.py of mmsegmentation does: every Rural and Urban file of a split into one
    folder, img_dir/<split lower-case> and ann_dir/<split lower-case> (no Test masks), masks unchanged."""
    for split in SPLITS:
        for location in ("Rural", "Urban"):
            for kind, folder in (("images_png", "img_dir"), ("masks_png", "ann_dir")):
                if split == "Test" and kind == "masks_png":
                    continue
                destination = out / folder / split.lower()
                destination.mkdir(parents=True, exist_ok=True)
                for file in (official / split / location / kind).iterdir():
                    shutil.copyfile(file, destination / file.name)
    return out


@pytest.fixture(scope="module")
def mmseg_tree(tiny_tree, tmp_path_factory) -> Path:
    return mmseg_convert(tiny_tree, tmp_path_factory.mktemp("mmseg") / "loveDA")


def by_file(dataset: LoveDA) -> dict[str, dict]:
    return {Path(item["name"]).name: item for item in (dataset[i] for i in range(len(dataset)))}


@pytest.mark.parametrize("split", SPLITS)
def test_the_mmseg_layout_gives_the_samples_of_the_official_one(tiny_tree, mmseg_tree, split):
    official, mmseg = LoveDA(tiny_tree, split), LoveDA(mmseg_tree, split)
    assert (official.layout, mmseg.layout) == ("official", "mmseg")
    expected, got = by_file(official), by_file(mmseg)
    assert sorted(got) == sorted(expected) and len(got) == len(official)
    assert mmseg.has_masks == (split != "Test")
    for name, item in expected.items():
        assert got[name]["name"] == name  # no scene folder in this layout
        assert np.array_equal(got[name]["image"].numpy(), item["image"].numpy())
        if mmseg.has_masks:
            assert np.array_equal(got[name]["mask"].numpy(), item["mask"].numpy())
        else:
            assert "mask" not in got[name]
    if mmseg.has_masks:  # raw 0 (no-data) became 255 and 1..7 became 0..6, as mmseg's reduce_zero_label does
        masks = np.stack([item["mask"].numpy() for item in got.values()])
        assert 255 in masks and masks[masks != 255].max() <= 6


def test_the_mmseg_layout_is_validated_file_by_file(tmp_path, tiny_tree):
    root = mmseg_convert(tiny_tree, tmp_path / "loveDA")
    report = validate_dataset(LoveDA(root, "Val"), cache_dir=tmp_path / "cache")
    assert report.ok and report.decoded == report.checked == 2 * len(LoveDA(root, "Val"))
    assert report.scope == f"loveda-mmseg {root.resolve()} Val"
    broken = sorted((root / "ann_dir" / "val").iterdir())[0]
    data = broken.read_bytes()
    broken.write_bytes(data[:len(data) // 2])  # header intact, pixel data cut short (an interrupted copy)
    report = validate_dataset(LoveDA(root, "Val"), cache_dir=tmp_path / "cache")
    assert report.decoded == 1 and len(report.failures) == 1 and str(broken) in report.failures[0]


def test_mmseg_layout_errors_name_the_folder_and_what_to_do(tmp_path, tiny_tree, mmseg_tree):
    with pytest.raises(ConfigError, match=r"mmseg's LoveDA layout .*scenes 'urban' cannot be selected.*'both'"):
        LoveDA(mmseg_tree, "Train", scenes="urban")
    both = tmp_path / "both"
    shutil.copytree(mmseg_tree, both)
    (both / "Val").mkdir()
    with pytest.raises(DataError, match=r"both LoveDA layouts: the official Val/ and mmseg's img_dir/"):
        detect_layout(both)
    no_masks = mmseg_convert(tiny_tree, tmp_path / "no_masks")
    shutil.rmtree(no_masks / "ann_dir" / "train")
    with pytest.raises(MissingFileError, match=r"Train mask directory \(mmseg layout\) not found: .*ann_dir/train"):
        LoveDA(no_masks, "Train")
    lost = sorted((no_masks / "ann_dir" / "val").iterdir())[0]
    lost.unlink()
    with pytest.raises(MissingFileError, match=rf"1 LoveDA Val image\(s\) have no mask: .*expected mask .*{lost.name}"):
        LoveDA(no_masks, "Val")


@pytest.mark.slow
def test_training_reads_the_mmseg_layout(tmp_path, mmseg_tree, world_of_one):
    output = tmp_path / "run"
    config = tiny_run_config(mmseg_tree, output, train={"max_steps": 2, "eval_every": 2, "save_every": 2})
    finetune(["--config", str(write_config(tmp_path / "run.yaml", config))])
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["kind"] == "train"] == [1, 2]
    val = [row for row in rows if row["kind"] == "val"]
    assert [row["step"] for row in val] == [2] and 0 <= val[0]["miou"] <= 1
    assert (output / "export").is_dir()


@pytest.fixture
def world_of_one(monkeypatch):
    """No launcher variables: main() forms its own world of one in this process."""
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # registered for restoring, then removed
        monkeypatch.delenv(key)
