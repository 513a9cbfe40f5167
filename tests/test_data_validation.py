"""Early data validation (every file decoded before the first step, cached) and the synthetic-data rule."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, Features
from datasets import Image as HFImage
from PIL import Image

from conftest import REPO, clear_world, subprocess_env, tiny_run_config, write_config
from mapsage_ds.builders import prepare_data_root, validate_data
from mapsage_ds.cli import finetune
from mapsage_ds.cli.args import add_config_arguments, config_from_args
from mapsage_ds.config import DataConfig
from mapsage_ds.data import HFSegmentationDataset, LoveDA
from mapsage_ds.data.synthetic import MARKER_NAME
from mapsage_ds.data.validation import cache_file_for, default_cache_dir, validate_dataset, validation_error
from mapsage_ds.errors import ConfigError, DataError
from mapsage_ds.runtime.network import free_port


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test validates against its own cache, never the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))
    return default_cache_dir()


@pytest.fixture
def tree(tiny_tree: Path, tmp_path: Path) -> Path:
    """A private copy of the session tree, free to break."""
    return Path(shutil.copytree(tiny_tree, tmp_path / "tree"))


@pytest.fixture
def no_world(monkeypatch: pytest.MonkeyPatch) -> None:
    """No launcher variables: ``finetune.main`` forms its own world of one process, as plain ``python`` does."""
    clear_world(monkeypatch)


def truncate(path: Path) -> Path:
    """Cut a real PNG in half: the header still reads, the pixel data does not."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def put_value_in_mask(path: Path, value: int) -> Path:
    with Image.open(path) as mask:
        raw = np.array(mask)
    raw[:4, :4] = value
    Image.fromarray(raw).save(path)
    return path


def first_file(tree: Path, split: str, scene: str, folder: str) -> Path:
    return sorted((tree / split / scene / folder).glob("*.png"))[0]


# ----------------------------------------------------------------------------------------------
# A real run stops before its first step


def test_a_truncated_image_and_a_mask_holding_9_stop_the_run_before_its_first_step(tree, tmp_path, no_world):
    image = truncate(first_file(tree, "Train", "Urban", "images_png"))
    mask = put_value_in_mask(first_file(tree, "Val", "Rural", "masks_png"), 9)
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_run_config(tree, run))

    with pytest.raises(DataError) as info:
        finetune.main(["--config", str(config), "--accelerator", "cpu"])
    message = str(info.value)
    assert "2 broken file(s)" in message
    assert f"{image}: cannot decode image (image file is truncated)" in message
    assert f"{mask}: raw LoveDA mask holds values [9] outside 0..7" in message
    # Stopped at start-up: nothing was trained, logged or saved.
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    assert not (run / "export").exists() and not (run / "best").exists()


def test_data_validate_false_skips_the_check(tree, one_process_world):
    truncate(first_file(tree, "Train", "Urban", "images_png"))
    assert validate_data(DataConfig(root=str(tree), validate=False), one_process_world) == []
    with pytest.raises(DataError, match="image file is truncated"):
        validate_data(DataConfig(root=str(tree)), one_process_world)


# ----------------------------------------------------------------------------------------------
# The cache


def test_the_cache_decodes_only_new_or_changed_files(tree, private_cache):
    dataset = LoveDA(tree, "Train")
    first = validate_dataset(dataset, cache_dir=private_cache)
    assert first.ok and first.checked == 2 * len(dataset) == first.decoded
    assert first.cache_file == cache_file_for(dataset.validation_scope(), private_cache)
    assert first.cache_file.parent == private_cache and first.cache_file.is_file()

    again = validate_dataset(LoveDA(tree, "Train"), cache_dir=private_cache)
    assert again.ok and again.decoded == 0 and again.checked == first.checked

    # Touched (same bytes, new mtime) and rewritten (new bytes) files are decoded again, and only they.
    touched = first_file(tree, "Train", "Urban", "images_png")
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    broken = put_value_in_mask(first_file(tree, "Train", "Rural", "masks_png"), 9)
    after = validate_dataset(LoveDA(tree, "Train"), cache_dir=private_cache)
    assert after.decoded == 2
    assert len(after.failures) == 1 and after.failures[0].startswith(f"{broken}: raw LoveDA mask holds values [9]")

    # A broken file is never recorded as passed; fixed, it passes and joins the cache.
    assert validate_dataset(LoveDA(tree, "Train"), cache_dir=private_cache).decoded == 1
    put_value_in_mask(broken, 1)
    fixed = validate_dataset(LoveDA(tree, "Train"), cache_dir=private_cache)
    assert fixed.ok and fixed.decoded == 1
    assert validate_dataset(LoveDA(tree, "Train"), cache_dir=private_cache).decoded == 0


def test_a_scenes_subset_shares_the_split_cache_and_keeps_the_other_scenes(tree, private_cache):
    both = validate_dataset(LoveDA(tree, "Val"), cache_dir=private_cache)
    urban = validate_dataset(LoveDA(tree, "Val", scenes="urban"), cache_dir=private_cache)
    assert urban.cache_file == both.cache_file and urban.decoded == 0
    assert validate_dataset(LoveDA(tree, "Val"), cache_dir=private_cache).decoded == 0


def test_an_unreadable_cache_is_ignored_and_rewritten(tree, private_cache):
    dataset = LoveDA(tree, "Val")
    cache_file = cache_file_for(dataset.validation_scope(), private_cache)
    cache_file.parent.mkdir(parents=True)
    cache_file.write_text("{not json")
    report = validate_dataset(dataset, cache_dir=private_cache)
    assert report.ok and report.decoded == report.checked
    assert json.loads(cache_file.read_text())["scope"] == dataset.validation_scope()


def test_every_broken_file_is_listed_up_to_twenty(tree):
    masks = sorted(tree.glob("Train/*/masks_png/*.png"))
    for mask in masks:
        put_value_in_mask(mask, 8)
    report = validate_dataset(LoveDA(tree, "Train"), cache_dir=None)
    assert len(report.failures) == len(masks) and report.decoded == report.checked
    error = validation_error([report])
    assert isinstance(error, DataError) and all(str(mask) in str(error) for mask in masks)
    assert "... and 12 more" in str(validation_error([report] * 4))  # 4 x 8 failures, 20 listed
    assert validation_error([validate_dataset(LoveDA(tree, "Val"), cache_dir=None)]) is None


def test_hf_rows_are_decoded_through_the_dataset_and_cached_by_fingerprint(tree, tmp_path, private_cache):
    samples = LoveDA(tree, "Train").samples
    rows = {"image": [str(s.image) for s in samples], "mask": [str(s.mask) for s in samples]}
    shutil.copy(samples[2].mask, tmp_path / "bad_mask.png")
    rows["mask"][2] = str(put_value_in_mask(tmp_path / "bad_mask.png", 9))
    features = Features({"image": HFImage(), "mask": HFImage()})
    Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))

    report = validate_dataset(HFSegmentationDataset(tmp_path / "hf"), cache_dir=private_cache)
    assert report.checked == report.decoded == len(samples)
    assert report.failures == (f"{tmp_path / 'hf'} row 2 column 'mask': raw LoveDA mask holds values [9] outside "
                               "0..7 (0 = no-data, 1..7 = background..agriculture)",)
    assert validate_dataset(HFSegmentationDataset(tmp_path / "hf"), cache_dir=private_cache).decoded == 1
    # The same rows read with another mask encoding are another check: all are decoded again.
    index = validate_dataset(HFSegmentationDataset(tmp_path / "hf", mask_encoding="index"), cache_dir=private_cache)
    assert index.decoded == len(samples) and len(index.failures) == len(samples)


# ----------------------------------------------------------------------------------------------
# Several ranks


# What validate_data does on each rank, without importing the model stack (halves the start-up time).
_TWO_RANKS = """
import json, sys
import torch.distributed as dist
from mapsage_ds.data import LoveDA
from mapsage_ds.data.validation import default_cache_dir, validate_dataset, validation_error
from mapsage_ds.errors import MapSageError
from mapsage_ds.runtime.failures import raise_if_any_failed

dist.init_process_group("gloo")
rank, world_size = dist.get_rank(), dist.get_world_size()
outcome = {}
for round in ("first", "again"):
    reports = [validate_dataset(LoveDA(sys.argv[1], split), cache_dir=default_cache_dir(), rank=rank,
                                world_size=world_size) for split in ("Train", "Val")]
    outcome[round] = [[r.checked, r.decoded, list(r.failures)] for r in reports]
    try:
        raise_if_any_failed(validation_error(reports))
    except MapSageError as error:
        outcome[round + "_error"] = [type(error).__name__, str(error)]
with open(f"{sys.argv[2]}/rank{rank}.json", "w") as stream:
    json.dump(outcome, stream)
dist.destroy_process_group()
"""


def test_two_ranks_share_the_work_agree_and_fail_together(tree, tmp_path):
    train_image = truncate(first_file(tree, "Train", "Urban", "images_png"))
    val_mask = put_value_in_mask(sorted((tree / "Val" / "Rural" / "masks_png").glob("*.png"))[-1], 9)
    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    env = {**subprocess_env(), "XDG_CACHE_HOME": os.environ["XDG_CACHE_HOME"], "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [subprocess.Popen([sys.executable, str(script), str(tree), str(tmp_path)], env={**env, "RANK": str(r)},
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outputs = [rank.communicate(timeout=300)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], "\n".join(out[-3000:] for out in outputs)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    # Each rank decoded its share; both hold the same report, naming the files whichever rank found them.
    assert rank0["first"] == rank1["first"]
    assert [(checked, decoded) for checked, decoded, _ in rank0["first"]] == [(16, 16), (12, 12)]
    # The lowest rank raises the one error naming both files; the other stops without printing it again.
    assert rank0["first_error"][0] == "DataError" and rank1["first_error"][0] == "FailedOnAnotherRank"
    assert str(train_image) in rank0["first_error"][1] and str(val_mask) in rank0["first_error"][1]
    # Rank 0 cached what both ranks passed: the second round decodes only the two broken files.
    assert rank0["again"] == rank1["again"]
    assert [(decoded, len(failures)) for _, decoded, failures in rank0["again"]] == [(1, 1), (1, 1)]


# ----------------------------------------------------------------------------------------------
# Synthetic data only where the recipe puts it


def parse(argv: list[str]):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, default_recipe="demo")
    return config_from_args(parser.parse_args(argv), default_recipe="demo")


# A small tree: size and counts at their minimum, so generating it takes a fraction of a second.
SMALL = ["--set", "data.synthetic={size: 64, train_per_scene: 1, val_per_scene: 1, test_per_scene: 1}"]


def test_a_mistyped_data_root_with_the_demo_recipe_fails_and_writes_nothing(tmp_path, monkeypatch, no_world):
    monkeypatch.chdir(tmp_path)
    typo = tmp_path / "data" / "demo_lovda"
    with pytest.raises(ConfigError) as info:
        finetune.main(["--data-root", str(typo), "--output-dir", str(tmp_path / "run"), "--accelerator", "cpu"])
    message = str(info.value)
    assert f"data.root={typo} holds no generated LoveDA tree" in message
    assert "only at the recipe's own data.root: data/demo_loveda (recipe demo, demo_full, distill_demo)" in message
    assert "--generate-data" in message and "data.synthetic=null" in message
    assert not typo.exists() and not (tmp_path / "data" / "demo_loveda").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_generate_data_generates_at_the_given_root(tmp_path, one_process_world):
    root = tmp_path / "elsewhere"
    config = parse(["--data-root", str(root), "--generate-data", *SMALL])
    assert config.data.generate
    prepare_data_root(config.data, one_process_world)
    assert (root / MARKER_NAME).is_file() and len(LoveDA(root, "Train")) == 2
    # Complete, it is used without the flag from then on.
    prepare_data_root(parse(["--data-root", str(root), *SMALL]).data, one_process_world)


def test_the_recipe_default_root_generates_without_a_flag(tmp_path, monkeypatch, one_process_world):
    monkeypatch.chdir(tmp_path)  # the demo's data.root is relative: data/demo_loveda here
    config = parse(SMALL)
    assert config.data.root == "data/demo_loveda" and not config.data.generate
    prepare_data_root(config.data, one_process_world)
    assert (tmp_path / "data" / "demo_loveda" / MARKER_NAME).is_file()
    # The same place written another way is the same place.
    prepare_data_root(parse(["--data-root", str(tmp_path / "data" / "." / "demo_loveda"), *SMALL]).data,
                      one_process_world)


def test_files_with_unreadable_headers_are_all_named_when_the_dataset_is_built(tree):
    # An interrupted copy leaves empty files: they fail already when the file list is read.
    empty = [first_file(tree, "Train", scene, "images_png") for scene in ("Urban", "Rural")]
    for path in empty:
        path.write_bytes(b"")
    with pytest.raises(DataError) as info:
        LoveDA(tree, "Train")
    assert str(info.value).startswith("2 LoveDA Train samples have unreadable or mismatched files")
    assert all(f"{path}: cannot read as an image" in str(info.value) for path in empty)
