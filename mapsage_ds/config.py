"""Typed run configuration: nested dataclasses <- YAML recipe <- dotted ``--set`` overrides.

A run is fully described by one :class:`Config`. Recipes are YAML files holding any subset of
its fields; ``--set optim.lr=1e-4`` overrides single values. Unknown keys and wrongly typed
values raise :class:`~mapsage_ds.errors.ConfigError` naming the key and what was expected.
The resolved config is saved beside the run's outputs and inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mapsage_ds.errors import ConfigError, MissingFileError


@dataclass
class SyntheticConfig:
    """Size of the generated LoveDA-format tree used by the demo and the tests."""

    size: int = 256
    train_per_scene: int = 24
    val_per_scene: int = 8
    test_per_scene: int = 4
    nodata_fraction: float = 0.3
    seed: int = 0


@dataclass
class DataConfig:
    """Where the data comes from and how batches are cut."""

    source: str = "loveda"  # loveda | hf
    root: str | None = None
    scenes: str = "both"  # urban | rural | both
    train_split: str = "Train"
    val_split: str = "Val"
    # Generate a synthetic LoveDA-format tree at `root` when set (demo and tests only).
    synthetic: SyntheticConfig | None = None
    hf_image_column: str = "image"
    hf_mask_column: str = "mask"
    hf_mask_encoding: str = "loveda_raw"  # loveda_raw | index
    crop_size: int = 512
    hflip: bool = True
    num_workers: int = 2


@dataclass
class ModelConfig:
    """Which network to build and which local weights to start from."""

    arch: str = "segformer"
    size: str = "b0"  # tiny | b0 .. b5
    pretrained: str | None = None  # local HF directory, .safetensors or .pth/.pt/.bin state dict
    num_classes: int = 7


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (ours, stepped per optimizer step)."""

    lr: float = 6e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0
    schedule: str = "poly"  # cosine | poly | constant
    warmup_steps: int = 0
    warmup_start_factor: float = 1e-3
    min_lr_ratio: float = 0.0
    poly_power: float = 1.0


@dataclass
class TrainConfig:
    """Loop length, batch geometry, cadence of evaluation and checkpoints."""

    max_steps: int = 1000
    micro_batch_size: int = 2  # per process
    grad_accum_steps: int = 1
    deepspeed: str = "zero2_bf16"  # a name in ds_configs/ or a path to a JSON file
    eval_every: int = 500
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0


@dataclass
class EvalConfig:
    """Validation protocol; identical for every experiment so tracks compare fairly."""

    batch_size: int = 1
    max_images: int | None = None  # evaluate on the first N images only (None: all)


@dataclass
class Config:
    """One complete run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/default"


# ----------------------------------------------------------------------------------------------
# Building a config from plain data


def from_dict(cls: type, data: dict[str, Any], *, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, checking every key and value type.

    Raises:
        ConfigError: on an unknown key (with the closest valid one) or a mistyped value.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(_unknown_key_message(prefix + str(key), key, names))
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    return cls(**kwargs)


def _abbreviates(short: str, long: str) -> bool:
    """Whether ``short`` is the initials of a multi-word ``long`` (lr, learning_rate)."""
    return "_" in long and short == "".join(word[:1] for word in long.split("_"))


def _unknown_key_message(dotted: str, key: str, valid: list[str]) -> str:
    key = str(key)
    # difflib misses abbreviations (learning_rate vs lr), so initials count as a match too.
    close = difflib.get_close_matches(key, valid, n=1) or [
        name for name in valid if _abbreviates(name, key) or _abbreviates(key, name)
    ][:1]
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown config key '{dotted}'{hint} (valid keys here: {', '.join(valid)})"


# PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent: `1e-4` loads as a string.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(annotation: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in (o for o in options if o is not type(None)):
            if dataclasses.is_dataclass(option) and isinstance(value, dict):
                # A mapping can only mean the section: keep its error, which names the nested key.
                return _coerce(option, value, key)
            try:
                return _coerce(option, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(annotation)}, got {value!r}")
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value if value is not None else {}, prefix=key + ".")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_type)}, got {value!r}")
        return [_coerce(item_type, item, f"{key}[{i}]") for i, item in enumerate(value)]
    if annotation is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)
    if annotation in (int, str, bool) and type(value) is annotation:
        return value
    raise ConfigError(f"{key}: expected {_type_name(annotation)}, got {value!r} ({type(value).__name__})")


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for YAML, JSON and checkpoints)."""
    return dataclasses.asdict(config)


# ----------------------------------------------------------------------------------------------
# Recipes, files and overrides


def recipe_names() -> list[str]:
    """Names of the YAML recipes packaged in ``mapsage_ds/recipes``."""
    folder = resources.files("mapsage_ds") / "recipes"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing or malformed file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def read_recipe(name: str) -> dict[str, Any]:
    """Read a packaged recipe by name."""
    names = recipe_names()
    if name not in names:
        raise ConfigError(_unknown_key_message(f"recipe {name}", name, names).replace("config key", "recipe"))
    with resources.as_file(resources.files("mapsage_ds") / "recipes" / f"{name}.yaml") as path:
        return read_yaml(path)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a key path and a YAML-parsed value."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}': expected the form key.sub=value")
    value = yaml.safe_load(raw) if raw.strip() else None
    return key.strip().split("."), value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``value`` at the dotted ``path`` of a nested dict, creating mappings as needed."""
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: '{part}' is not a section")
        node = child
    node[path[-1]] = value


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    *, recipe: str | None = None, config_file: str | Path | None = None, overrides: list[str] = ()
) -> Config:
    """Resolve a run config: defaults <- packaged recipe <- user YAML file <- ``--set`` overrides."""
    data: dict[str, Any] = {}
    if recipe is not None:
        data = merge(data, read_recipe(recipe))
    if config_file is not None:
        data = merge(data, read_yaml(config_file))
    for text in overrides:
        path, value = parse_override(text)
        apply_override(data, path, value)
    config = from_dict(Config, data)
    validate(config)
    return config


_CHOICES = {
    "data.source": ("loveda", "hf"),
    "data.scenes": ("urban", "rural", "both"),
    "data.hf_mask_encoding": ("loveda_raw", "index"),
    "optim.schedule": ("cosine", "poly", "constant"),
    "model.arch": ("segformer",),
}


def validate(config: Config) -> None:
    """Check value ranges and choices, reporting every problem in one error."""
    problems = []
    for dotted, choices in _CHOICES.items():
        section, name = dotted.split(".")
        value = getattr(getattr(config, section), name)
        if value not in choices:
            problems.append(f"{dotted}={value!r}: expected one of {', '.join(choices)}")
    positive = {
        "train.max_steps": config.train.max_steps,
        "train.micro_batch_size": config.train.micro_batch_size,
        "train.grad_accum_steps": config.train.grad_accum_steps,
        "train.eval_every": config.train.eval_every,
        "train.save_every": config.train.save_every,
        "train.log_every": config.train.log_every,
        "train.keep_checkpoints": config.train.keep_checkpoints,
        "data.crop_size": config.data.crop_size,
        "eval.batch_size": config.eval.batch_size,
        "model.num_classes": config.model.num_classes,
        "optim.lr": config.optim.lr,
    }
    problems += [f"{key}={value!r}: expected a value > 0" for key, value in positive.items() if value <= 0]
    if config.optim.warmup_steps < 0 or config.optim.warmup_steps >= config.train.max_steps:
        problems.append(f"optim.warmup_steps={config.optim.warmup_steps}: expected 0 <= value < train.max_steps")
    if len(config.optim.betas) != 2:
        problems.append(f"optim.betas={config.optim.betas}: expected two values")
    if config.data.root is None:
        problems.append("data.root is not set: pass --data-root or --set data.root=PATH")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def save_resolved(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (a file that ``--config`` accepts back)."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
