"""Commands and data layouts the README and docs show, run as shown: the health check against the tracks file,
and parquet datasets split by file and folder names as Hugging Face names them."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import yaml
from datasets import Dataset, Features, Value
from datasets import Image as HFImage

from conftest import REPO
from mapsage_ds.cli.health import main as health
from mapsage_ds.data.hf_source import HFSegmentationDataset, parquet_splits
from mapsage_ds.errors import ConfigError


def check_6(tmp_path: Path, tiny_tree: Path, recipe: str, tracks: Path) -> dict:
    report = tmp_path / f"{recipe}.json"
    health(["--recipe", recipe, "--data-root", str(tiny_tree), "--final-eval", str(tracks), "--only", "6",
            "--report", str(report), "--output-dir", str(tmp_path / "out")])
    results = json.loads(report.read_text())["results"]
    return next(r for r in results if r["name"] == "6.evaluation_consistency")


def test_check_6_passes_for_the_tracks_file_the_readme_names_and_fails_when_it_keeps_to_itself(
        tmp_path, tiny_tree, world_of_one):
    # The recipes validate with `whole`; docs/tracks.yaml scores `slide` 1024/512 and gives that to validation.
    for recipe in ("segformer_b5_loveda", "dinov3_sat_vitl_loveda"):
        result = check_6(tmp_path, tiny_tree, recipe, REPO / "docs" / "tracks.yaml")
        assert result["status"] == "PASS", result
        assert "applied to each track's validation" in result["message"]

    own = yaml.safe_load((REPO / "docs" / "tracks.yaml").read_text())
    own["evaluation"]["apply_to_validation"] = False
    tracks = tmp_path / "tracks.yaml"
    tracks.write_text(yaml.safe_dump(own))
    result = check_6(tmp_path, tiny_tree, "segformer_b5_loveda", tracks)
    assert result["status"] == "FAIL", result
    assert "mode: validation whole vs final slide" in result["message"]


def _write(path: Path, rows: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict({"name": [f"{path.stem}-{i}" for i in range(rows)]},
                      features=Features({"name": Value("string")})).to_parquet(str(path))


def test_parquet_files_and_folders_named_for_a_split_form_that_split(tmp_path):
    hub = tmp_path / "hub"  # the names the Hugging Face hub's parquet exports use
    _write(hub / "train-00000-of-00002.parquet", 2)
    _write(hub / "train-00001-of-00002.parquet", 1)
    _write(hub / "validation-00000-of-00001.parquet", 2)
    (hub / "README.md").write_text("not data")
    assert {k: [p.name for p in v] for k, v in parquet_splits(hub).items()} == {
        "train": ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"],
        "validation": ["validation-00000-of-00001.parquet"]}

    folders = tmp_path / "folders"
    _write(folders / "train" / "part-0.parquet", 3)
    _write(folders / "val" / "part-0.parquet", 1)
    assert sorted(parquet_splits(folders)) == ["train", "validation"]

    plain = tmp_path / "plain"  # no split names: the whole folder is `train`, as load_dataset makes it
    _write(plain / "part-0.parquet", 1)
    _write(plain / "part-1.parquet", 1)
    assert {k: len(v) for k, v in parquet_splits(plain).items()} == {"train": 2}


def test_a_parquet_split_is_read_and_a_missing_one_is_named(tmp_path, tiny_tree, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    features = Features({"image": HFImage(), "mask": HFImage()})
    (tmp_path / "d").mkdir()
    images = sorted((tiny_tree / "Val" / "Urban" / "images_png").glob("*.png"))
    columns = {"image": [str(p) for p in images], "mask": [str(p.parent.parent / "masks_png" / p.name) for p in images]}
    Dataset.from_dict(columns, features=features).to_parquet(str(tmp_path / "d" / "validation.parquet"))
    Dataset.from_dict(columns, features=features).select([0]).to_parquet(str(tmp_path / "d" / "train.parquet"))
    assert len(HFSegmentationDataset(tmp_path / "d", split="validation")) == len(images)
    assert len(HFSegmentationDataset(tmp_path / "d", split="train")) == 1
    with pytest.raises(ConfigError, match=r"split 'test' not found.*'train': \['train.parquet'\].*validation"):
        HFSegmentationDataset(tmp_path / "d", split="test")
    with pytest.raises(ConfigError, match=r"split None not found"):
        HFSegmentationDataset(tmp_path / "d")
