"""Tests of the run config: defaults, packaged recipes, YAML files, ``--set`` overrides and their errors."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from mapsage_ds.config import (
    Config,
    DataConfig,
    load_config,
    read_recipe,
    recipe_names,
    save_resolved,
    to_dict,
)
from mapsage_ds.data.synthetic import SyntheticSpec
from mapsage_ds.errors import ConfigError, MissingFileError

ROOT = ["data.root=/x"]


def _leaves(data: dict, prefix: str = "") -> dict[str, object]:
    """Flatten a nested mapping to ``{"a.b": value}``."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _error(overrides: list[str], **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides, **kwargs)
    return str(info.value)


# --- defaults and recipes ----------------------------------------------------------------------


def test_defaults_load_and_equal_the_dataclass_defaults() -> None:
    config = load_config(overrides=ROOT)
    assert isinstance(config, Config)
    assert config == Config(data=DataConfig(root="/x"))
    # Spot-check a few documented defaults so a silently changed dataclass default shows up here.
    assert (config.optim.lr, config.optim.schedule, config.train.deepspeed) == (6e-5, "poly", "zero2_bf16")
    assert config.data.synthetic is None and config.eval.max_images is None


def test_defaults_without_data_root_are_rejected_with_a_hint_where_data_is_read() -> None:
    # A config without data.root loads (the dry run and the planner read no data); the commands that
    # read data stop at their first use of it with the same hint.
    from mapsage_ds.builders import build_dataset

    config = load_config()
    with pytest.raises(ConfigError) as info:
        build_dataset(config.data, "Train")
    assert "data.root" in str(info.value) and "--set data.root=PATH" in str(info.value)


def test_there_is_at_least_one_packaged_recipe() -> None:
    assert "demo" in recipe_names()


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_resolves_and_keeps_its_values(name: str) -> None:
    raw = read_recipe(name)
    overrides = [] if raw.get("data", {}).get("root") else ROOT
    config = load_config(recipe=name, overrides=overrides)
    resolved = _leaves(to_dict(config))
    for dotted, value in _leaves(raw).items():
        assert resolved[dotted] == (value if dotted != "data.root" or value else "/x"), dotted
    # Keys the recipe leaves out keep their defaults (optional sections it fills in excepted).
    set_by_recipe = _leaves(raw)
    for dotted, default in _leaves(to_dict(Config())).items():
        if dotted == "data.root" or dotted in set_by_recipe or any(k.startswith(dotted + ".") for k in set_by_recipe):
            continue
        assert resolved[dotted] == default, dotted


def test_demo_recipe_builds_the_nested_synthetic_section() -> None:
    config = load_config(recipe="demo")
    assert isinstance(config.data.synthetic, SyntheticSpec)
    assert config.data.synthetic == SyntheticSpec(**read_recipe("demo")["data"]["synthetic"])


def test_unknown_recipe_lists_and_suggests_names() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(recipe="dem")
    message = str(info.value)
    assert "dem" in message and "did you mean 'demo'" in message
    for name in recipe_names():
        assert name in message


# --- precedence: defaults <- recipe <- file <- overrides ----------------------------------------


def test_file_overrides_recipe_and_set_overrides_file(tmp_path: Path) -> None:
    demo = read_recipe("demo")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"max_steps": 77, "log_every": 3}, "model": {"size": "test"}}))
    config = load_config(recipe="demo", config_file=path, overrides=["train.log_every=5"])
    assert config.train.max_steps == 77  # file beats recipe
    assert config.model.size == "test"
    assert config.train.log_every == 5  # --set beats file
    # Recipe values the file does not touch survive the merge, in the same section too.
    assert config.train.micro_batch_size == demo["train"]["micro_batch_size"]
    assert config.optim.lr == demo["optim"]["lr"]


# --- --set overrides with YAML-typed values ----------------------------------------------------


@pytest.mark.parametrize("text", ["1.0e-4", "1e-4", "1E-4", "0.0001", "+1e-04", "1.e-4"])
def test_float_override_in_any_spelling(text: str) -> None:
    config = load_config(overrides=[*ROOT, f"optim.lr={text}"])
    assert isinstance(config.optim.lr, float)
    assert config.optim.lr == pytest.approx(1e-4, rel=1e-12)


def test_exponent_without_dot_in_a_yaml_file_is_a_float(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) loads `1e-4` as the string '1e-4'; the float field must still accept it.
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  root: /x\noptim:\n  lr: 1e-4\n  eps: 1e-10\n")
    assert isinstance(yaml.safe_load(path.read_text())["optim"]["lr"], str)
    config = load_config(config_file=path)
    assert (config.optim.lr, config.optim.eps) == (pytest.approx(1e-4), pytest.approx(1e-10))


def test_exponent_strings_only_become_floats_in_float_fields() -> None:
    config = load_config(overrides=["data.root=1e-4", "output_dir=2e3"])
    assert config.data.root == "1e-4" and config.output_dir == "2e3"
    assert "train.max_steps" in _error([*ROOT, "train.max_steps=1e3"])
    assert "eval.max_images" in _error([*ROOT, "eval.max_images=1e3"])


@pytest.mark.parametrize("text", ["abc", "nan", "1e", "e5", "1e-4x"])
def test_non_numeric_strings_are_not_floats(text: str) -> None:
    message = _error([*ROOT, f"optim.lr={text}"])
    assert "optim.lr" in message and "float" in message


def test_nested_overrides_with_typed_values() -> None:
    config = load_config(overrides=[
        *ROOT,
        "train.max_steps=12",
        "optim.warmup_steps=3",
        "optim.betas=[0.8, 0.95]",
        "data.hflip=false",
        "eval.max_images=5",
        "model.pretrained=/w/model.safetensors",
        "data.synthetic.size=64",
        "optim.grad_clip=2",  # an int where a float is expected is widened
    ])
    assert config.train.max_steps == 12 and type(config.train.max_steps) is int
    assert config.optim.warmup_steps == 3
    assert config.optim.betas == [0.8, 0.95]
    assert config.data.hflip is False
    assert config.eval.max_images == 5
    assert config.model.pretrained == "/w/model.safetensors"
    # Setting one key of an absent optional section builds it with defaults for the rest.
    assert config.data.synthetic == SyntheticSpec(size=64)
    assert config.optim.grad_clip == 2.0 and type(config.optim.grad_clip) is float


def test_null_override_clears_an_optional_value() -> None:
    config = load_config(recipe="demo", overrides=["data.synthetic=null", "eval.max_images=null"])
    assert config.data.synthetic is None and config.eval.max_images is None


def test_override_without_equals_sign_is_rejected() -> None:
    assert "optim.lr" in _error([*ROOT, "optim.lr"])


def test_override_below_a_leaf_is_rejected() -> None:
    # The demo recipe sets optim.lr, so `optim.lr.x` tries to descend into a float.
    message = _error(["optim.lr.x=1"], recipe="demo")
    assert "optim.lr.x" in message and "'lr' is not a section" in message


# --- unknown keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "dotted", "suggestion"),
    [
        ("optim.learning_rate=1e-4", "optim.learning_rate", "lr"),
        ("trian.max_steps=3", "trian", "train"),
        ("optim.weight_decy=0.1", "optim.weight_decy", "weight_decay"),
        ("optim.wd=0.1", "optim.wd", "weight_decay"),
        ("data.synthetic.szie=64", "data.synthetic.szie", "size"),
    ],
)
def test_unknown_key_names_the_key_and_the_closest_valid_one(override: str, dotted: str, suggestion: str) -> None:
    message = _error([*ROOT, override])
    assert f"unknown config key '{dotted}'" in message
    assert f"did you mean '{suggestion}'?" in message


def test_unknown_key_without_a_close_match_lists_the_valid_keys() -> None:
    message = _error([*ROOT, "train.zzz=1"])
    assert "'train.zzz'" in message and "did you mean" not in message
    for field in dataclasses.fields(Config().train):
        assert field.name in message


def test_unknown_key_in_a_yaml_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  root: /x\n  crop: 64\n")
    message = _error([], config_file=path)
    assert "'data.crop'" in message and "did you mean 'crop_size'?" in message


# --- wrongly typed values ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("train.max_steps=abc", "train.max_steps", "int"),
        ("train.max_steps=1.5", "train.max_steps", "int"),
        ("train.max_steps=true", "train.max_steps", "int"),  # bool is an int subclass, but not an int here
        ("data.hflip=3", "data.hflip", "bool"),
        ("data.hflip=yesplease", "data.hflip", "bool"),
        ("optim.lr=true", "optim.lr", "float"),
        ("optim.betas=0.9", "optim.betas", "a list of float"),
        ("optim.betas=[0.9, x]", "optim.betas[1]", "float"),
        ("model.size=3", "model.size", "str"),
        ("eval.max_images=many", "eval.max_images", "int | None"),
    ],
)
def test_wrong_type_names_the_key_and_the_expected_type(override: str, key: str, expected: str) -> None:
    message = _error([*ROOT, override])
    assert message.startswith(f"{key}: expected {expected}"), message


def test_a_section_given_a_scalar_is_rejected() -> None:
    message = _error([*ROOT, "optim=3"])
    assert "optim" in message and "mapping" in message


# --- validation --------------------------------------------------------------------------------


def test_all_validation_problems_are_reported_in_one_error() -> None:
    message = _error([
        *ROOT,
        "optim.schedule=linear",
        "data.scenes=city",
        "train.max_steps=0",
        "data.crop_size=-1",
        "optim.lr=0",
        "optim.betas=[0.9]",
    ])
    problems = [line.strip() for line in message.splitlines()[1:]]
    for key in ("optim.schedule='linear'", "data.scenes='city'", "train.max_steps=0", "data.crop_size=-1",
                "optim.lr=0.0", "optim.betas=[0.9]", "optim.warmup_steps=0"):
        assert any(line.startswith(key) for line in problems), (key, problems)
    # warmup_steps=0 is only invalid because max_steps=0 leaves no room: 7 problems in all.
    assert len(problems) == 7


@pytest.mark.parametrize("warmup", [-1, 10, 11])
def test_warmup_must_fit_inside_training(warmup: int) -> None:
    message = _error([*ROOT, "train.max_steps=10", f"optim.warmup_steps={warmup}"])
    assert f"optim.warmup_steps={warmup}" in message


def test_warmup_just_inside_training_is_accepted() -> None:
    assert load_config(overrides=[*ROOT, "train.max_steps=10", "optim.warmup_steps=9"]).optim.warmup_steps == 9


# --- files -------------------------------------------------------------------------------------


def test_save_resolved_round_trip(tmp_path: Path) -> None:
    config = load_config(recipe="demo", overrides=[
        "optim.lr=1e-4", "optim.eps=1.0e-12", "optim.betas=[0.85, 0.99]", "eval.max_images=3",
        "model.pretrained=/w/x.pth", "data.hflip=false", "output_dir=runs/rt",
    ])
    path = tmp_path / "resolved.yaml"
    save_resolved(config, path)
    assert yaml.safe_load(path.read_text()) == to_dict(config)
    again = load_config(config_file=path)
    assert again == config
    # Saving the reloaded config gives the same text: the round trip is a fixed point.
    second = tmp_path / "again.yaml"
    save_resolved(again, second)
    assert second.read_text() == path.read_text()


def test_save_resolved_round_trip_of_defaults(tmp_path: Path) -> None:
    config = load_config(overrides=ROOT)
    path = tmp_path / "resolved.yaml"
    save_resolved(config, path)
    assert load_config(config_file=path) == config


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(MissingFileError, match=re.escape(str(path))):
        load_config(config_file=path)
    with pytest.raises(FileNotFoundError):  # our error is also the builtin one
        load_config(config_file=path)


def test_malformed_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("data:\n  root: [unclosed\n")
    message = _error([], config_file=path)
    assert str(path) in message and "not valid YAML" in message


def test_yaml_that_is_not_a_mapping_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    message = _error([], config_file=path)
    assert str(path) in message and "mapping" in message


def test_empty_yaml_file_means_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(config_file=path, overrides=ROOT) == load_config(overrides=ROOT)


def test_the_class_count_is_the_dataset_s_not_a_config_key() -> None:
    # model.num_classes used to be validated and then ignored (8 still built a 7-class model); the
    # class count comes from the dataset's class list, so the key is gone and setting it is an error.
    message = _error([*ROOT, "model.num_classes=8"])
    assert "unknown config key 'model.num_classes'" in message
    message = _error([*ROOT, "loss.class_weights=[1, 1, 1, 1, 1, 1, 1, 1]"])
    assert "expected 7 values" in message


def test_commands_that_read_no_data_need_no_data_root() -> None:
    # The dry run and the planner load a config without data.root; commands that read data ask for it.
    from mapsage_ds.builders import data_root
    from mapsage_ds.config import DataConfig

    config = load_config(recipe="dinov3_sat_vitl_loveda")
    assert config.data.root is None
    with pytest.raises(ConfigError, match="data.root is not set"):
        data_root(DataConfig())
