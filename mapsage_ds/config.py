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

from mapsage_ds.data.classes import NUM_CLASSES
from mapsage_ds.data.synthetic import SyntheticSpec
from mapsage_ds.data.transforms import ColorJitter
from mapsage_ds.errors import ConfigError, MissingFileError
from mapsage_ds.evaluation.protocol import EvalProtocol


@dataclass
class AugmentConfig:
    """Training augmentations beyond ``data.crop_size`` crops and ``data.hflip``; all off by default.

    Attributes:
        crop_sizes: Multi-scale training: a crop size drawn per batch from this list; empty: ``data.crop_size``.
        scale_range: Random rescale factor ``[low, high]`` applied before the crop; ``[1.0, 1.0]``: none.
        vflip: Flip top-bottom with probability 0.5.
        rot90: Rotate by a random multiple of 90 degrees.
        rotate_degrees: Rotate by a random angle in ±degrees (with probability ``rotate_prob``); new pixels are
            ignored by the loss; 0: off.
        rotate_prob: Probability of the free rotation by ``rotate_degrees``.
        color_jitter: Colour jitter of brightness, contrast, saturation and hue; null: off.
        mixup: Probability that a batch is a MixUp batch.
        mixup_alpha: MixUp's blending weight is drawn from Beta(alpha, alpha).
        cutmix: Probability that a batch is a CutMix batch.
        cutmix_alpha: CutMix's kept area fraction is drawn from Beta(alpha, alpha).
    """

    crop_sizes: list[int] = field(default_factory=list)
    scale_range: list[float] = field(default_factory=lambda: [1.0, 1.0])
    vflip: bool = False
    rot90: bool = False
    rotate_degrees: float = 0.0
    rotate_prob: float = 0.5
    color_jitter: ColorJitter | None = None
    mixup: float = 0.0
    mixup_alpha: float = 0.4
    cutmix: float = 0.0
    cutmix_alpha: float = 1.0


@dataclass
class DataConfig:
    """Where the data comes from and how batches are cut.

    Attributes:
        source: ``loveda`` (a LoveDA folder tree) or ``hf`` (a local Hugging Face ``datasets`` dataset).
        root: The dataset: the LoveDA tree (``Train/``, ``Val/``, ``Test/``, or mmsegmentation's converted
            ``img_dir/``, ``ann_dir/``, detected), or with ``source: hf`` a ``save_to_disk`` folder or parquet
            files; ``--data-root`` sets it.
        scenes: Which LoveDA scenes to use: ``urban``, ``rural`` or ``both``.
        train_split: Split trained on: a LoveDA folder name, or the split name in the HF dataset.
        val_split: Split validated on during training.
        synthetic: Generate a synthetic LoveDA-format tree at ``root`` when set (demo and tests only).
        generate: Also generate it at a root no packaged recipe names (``--generate-data``); else a
            mistyped root is an error.
        validate: Decode every train/val image and mask before training (cached); false skips it, e.g.
            on a slow mount.
        hf_image_column: ``source: hf``: the column holding the images.
        hf_mask_column: ``source: hf``: the column holding the masks.
        hf_mask_encoding: ``source: hf``: mask values as in LoveDA's PNGs (``loveda_raw``: 0 no-data,
            1..7 classes) or training labels (``index``: 0..6, 255 ignored).
        crop_size: Side of the square training crop in pixels.
        hflip: Flip training crops left-right with probability 0.5.
        num_workers: Data-loader processes per rank; 0 loads in the training process.
        augment: Further training augmentations (all off by default).
        sampler: ``uniform``, or ``class_aware`` (repeat-factor sampling of images with rare classes).
        repeat_thresh: ``class_aware``: classes present in fewer than this fraction of images get repeated.
    """

    source: str = "loveda"
    root: str | None = None
    scenes: str = "both"
    train_split: str = "Train"
    val_split: str = "Val"
    synthetic: SyntheticSpec | None = None
    generate: bool = False
    validate: bool = True
    hf_image_column: str = "image"
    hf_mask_column: str = "mask"
    hf_mask_encoding: str = "loveda_raw"
    crop_size: int = 512
    hflip: bool = True
    num_workers: int = 2
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    sampler: str = "uniform"
    repeat_thresh: float = 0.5


@dataclass
class NormalizationConfig:
    """Input statistics (RGB in [0, 1] units) overriding those of the checkpoint's pretraining data.

    Attributes:
        mean: Per-channel mean subtracted from the input, R, G, B.
        std: Per-channel standard deviation the input is divided by, R, G, B.
    """

    mean: list[float]
    std: list[float]


@dataclass
class ModelConfig:
    """Which network to build and which local weights to start from.

    Attributes:
        arch: The network family: ``segformer`` or ``dinov3`` (a DINOv3 ViT backbone with a fusion head).
        size: SegFormer: ``auto``, ``test``, ``mini``, ``b0`` .. ``b5``; DINOv3: ``auto``, ``test``, ``vitl16``,
            ``vit7b16``. With ``model.pretrained`` the architecture comes from the checkpoint: ``auto`` takes
            it, a named size is checked against it.
        pretrained: Local weights (docs/weights.md): an HF directory or ``.safetensors``; an NVlabs,
            mmsegmentation or Meta DINOv3 ``.pth``; ``none``: random initialisation, intended; null: random
            initialisation, warned about at start-up unless the data is generated (``data.synthetic``).
        normalization: Input statistics; null: those of the checkpoint's pretraining data (SAT-493M
            satellite; LVD-1689M, ImageNet).
        drop_path_rate: Stochastic depth rate of the backbone.
        boundary_head: Auxiliary boundary head for training (never exported); needs ``loss.boundary > 0``.
        head: The decode head: ``auto`` (the architecture's own: DINOv3 ``fusion``, SegFormer its HF all-MLP
            head), ``fusion`` (DINOv3 only), ``upernet`` (PPM + FPN; on a ViT after a 4×/2×/1×/½× neck) or
            ``linear`` (BatchNorm + 1×1 convolution, the frozen-feature probe). docs/large_backbones.md.
        head_channels: Hidden width of the fusion or UPerNet head; null: 256 (fusion), 512 (UPerNet). Must be
            null for ``auto`` on SegFormer and for ``linear``.
        head_norm: Normalisation inside the fusion / UPerNet head and neck: ``batch`` (as mmsegmentation) or
            ``group`` (32 groups; needs no batch statistics, so it trains at one image per card, where
            BatchNorm fails on UPerNet's 1×1 pooled branch).
    """

    arch: str = "segformer"
    size: str = "b0"
    pretrained: str | None = None
    normalization: NormalizationConfig | None = None
    drop_path_rate: float = 0.1
    boundary_head: bool = False
    head: str = "auto"
    head_channels: int | None = None
    head_norm: str = "batch"


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (ours, stepped per optimizer step).

    Attributes:
        lr: Peak learning rate (of the head; backbone groups are scaled, see ``layer_decay``).
        weight_decay: AdamW weight decay of matmul and convolution weights; norms, biases and token
            embeddings get none.
        betas: AdamW's ``[beta1, beta2]``.
        eps: AdamW's epsilon.
        grad_clip: Clip the global gradient norm to this (DeepSpeed's ``gradient_clipping``); 0: no clipping.
        schedule: Decay after warmup: ``cosine``, ``poly`` or ``constant``.
        warmup_steps: Optimizer steps of linear warmup, from ``warmup_start_factor × lr`` to ``lr``.
        warmup_start_factor: The warmup's first learning rate as a fraction of ``lr``.
        min_lr_ratio: The learning rate decays to ``min_lr_ratio × lr`` at ``train.max_steps`` (cosine, poly).
        poly_power: Exponent of the poly decay, ``(1 - progress)^poly_power``.
        layer_decay: Backbone parameter lr = ``lr × backbone_lr_mult × layer_decay^(depth + 1 − layer_id)``;
            the head trains at ``lr``; 1: no decay.
        backbone_lr_mult: Multiplier of every backbone parameter's learning rate (see ``layer_decay``).
    """

    lr: float = 6e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0
    schedule: str = "poly"
    warmup_steps: int = 0
    warmup_start_factor: float = 1e-3
    min_lr_ratio: float = 0.0
    poly_power: float = 1.0
    layer_decay: float = 1.0
    backbone_lr_mult: float = 1.0


@dataclass
class UnfreezeStage:
    """From optimizer step ``at_step`` on, this fraction of the backbone (from the input side) is frozen.

    Attributes:
        at_step: Optimizer step at which this stage begins.
        frozen_fraction: Fraction of the backbone's layers, counted from the input side, frozen from then on.
    """

    at_step: int
    frozen_fraction: float


@dataclass
class UnfreezeConfig:
    """Progressive unfreezing: frozen layers get no update and cost no gradient or optimizer memory.

    Attributes:
        initial_frozen_fraction: Fraction of the backbone (from the input side) frozen from step 0.
        stages: Later stages, in increasing ``at_step`` order, each with its own frozen fraction.
    """

    initial_frozen_fraction: float = 0.0
    stages: list[UnfreezeStage] = field(default_factory=list)


@dataclass
class TrainConfig:
    """Loop length, batch geometry, cadence of evaluation and checkpoints.

    Attributes:
        max_steps: Optimizer steps of the run (the schedule ends here).
        micro_batch_size: Images per process per forward pass.
        grad_accum_steps: Micro-batches accumulated per optimizer step; a step sees
            ``micro_batch_size × grad_accum_steps × world size`` images.
        deepspeed: A name in ``ds_configs/`` (e.g. ``zero2_bf16``) or a path to a DeepSpeed JSON file.
        activation_checkpointing: Recompute backbone blocks in backward to save activation memory.
        eval_every: Validate every this many optimizer steps (and at the last); a new best mIoU is
            exported to ``best/``.
        save_every: Write a checkpoint every this many optimizer steps (and at the last).
        keep_checkpoints: Checkpoints kept, the newest by step; older ones are deleted (never the one
            ``latest`` names or the best one).
        log_every: Log loss and learning rate every this many optimizer steps.
        seed: Seed of the run's randomness: model initialisation (torch seeded with ``seed + rank``),
            data order and augmentations.
        nonfinite: A skipped (non-finite) step: ``stop`` the run, or ``skip`` it and go on
            (docs/reliability.md).
        max_skipped_share: Stop when more than this share of the last ``skip_window`` steps (or of the
            run, at its end) were skipped.
        skip_window: The number of recent steps ``max_skipped_share`` is measured over.
    """

    max_steps: int = 1000
    micro_batch_size: int = 2
    grad_accum_steps: int = 1
    deepspeed: str = "zero2_bf16"
    activation_checkpointing: bool = False
    eval_every: int = 500
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    nonfinite: str = "stop"
    max_skipped_share: float = 0.5
    skip_window: int = 50


@dataclass
class OhemConfig:
    """Online hard-example mining of the cross-entropy term.

    Attributes:
        thresh: Pixels whose true-class probability is below this are hard.
        min_kept: But at least this many pixels per image are kept.
    """

    thresh: float = 0.7
    min_kept: int = 100000


@dataclass
class LossConfig:
    """Weights of the loss terms and the cross-entropy options (see docs/training_recipe.md).

    Attributes:
        ce: Weight of the cross-entropy term.
        dice: Weight of the Dice term.
        lovasz: Weight of the Lovász-softmax term.
        boundary: Weight of the boundary loss; needs ``model.boundary_head``.
        class_weights: Cross-entropy weight per class (one per class, in class order); null: all 1.
        label_smoothing: Cross-entropy label smoothing, in [0, 1).
        ohem: Online hard-example mining of the cross-entropy; null: off.
        boundary_radius: Half-width of the boundary band, in label pixels.
    """

    ce: float = 1.0
    dice: float = 0.0
    lovasz: float = 0.0
    boundary: float = 0.0
    class_weights: list[float] | None = None
    label_smoothing: float = 0.0
    ohem: OhemConfig | None = None
    boundary_radius: int = 1


@dataclass
class TeacherBootstrapConfig:
    """Demo only: with no ``teacher.path``, first fine-tune a small DINOv3 teacher on the same data.

    Attributes:
        size: DINOv3 size of the teacher (``model.size`` values of ``dinov3``).
        max_steps: Optimizer steps of the teacher's fine-tuning run.
        lr: Learning rate of the teacher's fine-tuning run.
    """

    size: str = "test"
    max_steps: int = 60
    lr: float = 2e-3


@dataclass
class TeacherConfig:
    """The frozen teacher of ``task: distill`` (docs/distillation.md).

    Attributes:
        path: A MapSage export directory (``<finetune run>/export``), SegFormer or DINOv3.
        precision: ``auto`` (the student's compute dtype), ``bf16``, ``fp16`` or ``fp32``.
        feature_level: Which of the teacher's hidden-state maps is the feature target.
        offload_features: Precompute teacher outputs to disk (sharded by rank), then train from the cache.
        cache_dir: Where the offloaded features go; null: ``<output_dir>/teacher_cache``.
        bootstrap: Demo only: train a small teacher first when ``path`` is null.
    """

    path: str | None = None
    precision: str = "auto"
    feature_level: int = -1
    offload_features: bool = False
    cache_dir: str | None = None
    bootstrap: TeacherBootstrapConfig | None = None


@dataclass
class DistillConfig:
    """Loss weights of ``task: distill``; the student's supervised loss is the ``loss`` section.

    Attributes:
        supervised: Weight of the student's supervised loss (0: distillation only).
        kl: Weight of the pixel-wise KL divergence at ``temperature``, times temperature².
        temperature: Softmax temperature of the KL term.
        feature: Weight of the feature term: distance between projected student features and the teacher's.
        feature_loss: The feature distance: ``cosine`` or ``mse``.
        student_feature_level: Which student hidden state is projected; 2 is SegFormer stage 3 (stride 16,
            the teacher's patch grid).
    """

    supervised: float = 1.0
    kl: float = 1.0
    temperature: float = 2.0
    feature: float = 0.0
    feature_loss: str = "cosine"
    student_feature_level: int = 2


@dataclass
class Config:
    """One complete run.

    Attributes:
        data: The dataset and how batches are cut.
        model: The network and its starting weights.
        optim: The optimizer and learning-rate schedule.
        train: Loop length, batch geometry, evaluation and checkpoint cadence.
        eval: The evaluation protocol of validation during training and of ``mapsage-evaluate``.
        loss: The supervised loss.
        unfreeze: Progressive unfreezing of the backbone; null: everything trains from step 0.
        task: What is trained: ``segment`` (supervised) or ``distill`` (from a frozen teacher).
        teacher: The frozen teacher of ``task: distill``.
        distill: The distillation loss weights of ``task: distill``.
        output_dir: The run directory: ``config.yaml``, logs, checkpoints, ``best/`` and ``export/``.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalProtocol = field(default_factory=EvalProtocol)
    loss: LossConfig = field(default_factory=LossConfig)
    unfreeze: UnfreezeConfig | None = None
    task: str = "segment"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
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
        raise ConfigError(_unknown_key_message(name, name, names).replace("config key", "recipe")
                          .replace("valid keys here", "recipes"))
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


def _choices() -> dict[str, tuple[str, ...]]:
    """Allowed values of the choice keys, from the modules that own them."""
    # Imported here: these modules import the config's section types themselves.
    from mapsage_ds.data import SOURCES
    from mapsage_ds.data.classes import MASK_ENCODINGS
    from mapsage_ds.data.loveda import SCENES
    from mapsage_ds.data.samplers import SAMPLERS
    from mapsage_ds.losses.distill import FEATURE_LOSSES
    from mapsage_ds.models.decode_heads import HEAD_NORMS, HEADS
    from mapsage_ds.models.factory import ARCHITECTURES
    from mapsage_ds.optim.schedule import SCHEDULES
    from mapsage_ds.tasks.factory import TASKS
    from mapsage_ds.tasks.teacher import PRECISIONS
    from mapsage_ds.training.trainer import NONFINITE_POLICIES

    return {
        "data.source": SOURCES,
        "data.scenes": tuple(SCENES),
        "data.hf_mask_encoding": tuple(MASK_ENCODINGS),
        "optim.schedule": SCHEDULES,
        "model.arch": ARCHITECTURES,
        "model.head": HEADS,
        "model.head_norm": HEAD_NORMS,
        "data.sampler": SAMPLERS,
        "task": TASKS,
        "teacher.precision": ("auto", *PRECISIONS),
        "distill.feature_loss": FEATURE_LOSSES,
        "train.nonfinite": NONFINITE_POLICIES,
    }


def validate(config: Config) -> None:
    """Check value ranges and choices, reporting every problem in one error."""
    problems = []
    for dotted, choices in _choices().items():
        value = config
        for part in dotted.split("."):
            value = getattr(value, part)
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
        "train.skip_window": config.train.skip_window,
        "train.max_skipped_share": config.train.max_skipped_share,
        "data.crop_size": config.data.crop_size,
        "eval.batch_size": config.eval.batch_size,
        "optim.lr": config.optim.lr,
    }
    problems += [f"{key}={value!r}: expected a value > 0" for key, value in positive.items() if value <= 0]
    if config.optim.warmup_steps < 0 or config.optim.warmup_steps >= config.train.max_steps:
        problems.append(f"optim.warmup_steps={config.optim.warmup_steps}: expected 0 <= value < train.max_steps")
    if len(config.optim.betas) != 2:
        problems.append(f"optim.betas={config.optim.betas}: expected two values")
    problems += _unfreeze_problems(config)
    if not 0.0 < config.optim.layer_decay <= 1.0 or config.optim.backbone_lr_mult < 0.0:
        problems.append(f"optim.layer_decay={config.optim.layer_decay}, optim.backbone_lr_mult="
                        f"{config.optim.backbone_lr_mult}: expected 0 < layer_decay <= 1 and backbone_lr_mult >= 0")
    if config.model.size == "auto" and config.model.pretrained is None:
        problems.append("model.size=auto takes the architecture from model.pretrained, which is not set")
    if config.model.head == "upernet" and config.model.head_norm == "batch" and config.train.micro_batch_size < 2:
        problems.append("model.head=upernet with model.head_norm=batch and train.micro_batch_size=1: BatchNorm of "
                        "the 1×1 pooled branch sees one value per channel; set model.head_norm=group")
    norm = config.model.normalization
    if norm is not None and (len(norm.mean) != 3 or len(norm.std) != 3 or min(norm.std) <= 0):
        problems.append(f"model.normalization={{mean: {norm.mean}, std: {norm.std}}}: expected 3 values each, "
                        f"std > 0")
    problems += _recipe_problems(config)
    problems += _distill_problems(config)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _unfreeze_problems(config: Config) -> list[str]:
    plan = config.unfreeze
    if plan is None:
        return []
    problems = []
    fractions = [plan.initial_frozen_fraction] + [stage.frozen_fraction for stage in plan.stages]
    if any(not 0.0 <= f <= 1.0 for f in fractions):
        problems.append(f"unfreeze: frozen fractions {fractions} must lie in [0, 1]")
    steps = [stage.at_step for stage in plan.stages]
    if steps != sorted(set(steps)) or any(s <= 0 for s in steps):
        problems.append(f"unfreeze.stages: at_step values {steps} must be positive and strictly increasing")
    return problems


def _recipe_problems(config: Config) -> list[str]:
    """Problems of the loss, augmentation and sampler sections."""
    loss, aug, problems = config.loss, config.data.augment, []
    weights = {"ce": loss.ce, "dice": loss.dice, "lovasz": loss.lovasz, "boundary": loss.boundary}
    problems += [f"loss.{k}={v}: expected a weight >= 0" for k, v in weights.items() if v < 0]
    if loss.ce <= 0 and loss.dice <= 0 and loss.lovasz <= 0:
        problems.append("loss: ce, dice and lovasz are all 0; give at least one a weight > 0")
    if (loss.boundary > 0) != config.model.boundary_head:
        problems.append(f"loss.boundary={loss.boundary} with model.boundary_head={config.model.boundary_head}: "
                        "a boundary loss needs the boundary head and the head needs a loss weight > 0")
    if not 0.0 <= loss.label_smoothing < 1.0:
        problems.append(f"loss.label_smoothing={loss.label_smoothing}: expected 0 <= value < 1")
    if loss.class_weights is not None and (len(loss.class_weights) != NUM_CLASSES or min(loss.class_weights) < 0):
        problems.append(f"loss.class_weights={loss.class_weights}: expected {NUM_CLASSES} values >= 0 (one per class)")
    if loss.ohem is not None and not (0.0 < loss.ohem.thresh <= 1.0 and loss.ohem.min_kept >= 0):
        problems.append(f"loss.ohem={loss.ohem}: expected 0 < thresh <= 1 and min_kept >= 0")
    if loss.boundary_radius < 1:
        problems.append(f"loss.boundary_radius={loss.boundary_radius}: expected a value >= 1")
    if any(size <= 0 for size in aug.crop_sizes):
        problems.append(f"data.augment.crop_sizes={aug.crop_sizes}: expected positive sizes")
    if len(aug.scale_range) != 2 or not 0.0 < aug.scale_range[0] <= aug.scale_range[1]:
        problems.append(f"data.augment.scale_range={aug.scale_range}: expected [low, high] with 0 < low <= high")
    probabilities = {"rotate_prob": aug.rotate_prob, "mixup": aug.mixup, "cutmix": aug.cutmix}
    if aug.color_jitter is not None:
        probabilities["color_jitter.prob"] = aug.color_jitter.prob
        jitter = aug.color_jitter
        if min(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) < 0 or jitter.hue > 0.5:
            problems.append(f"data.augment.color_jitter={jitter}: expected values >= 0 and hue <= 0.5")
    problems += [f"data.augment.{k}={v}: expected a probability in [0, 1]"
                 for k, v in probabilities.items() if not 0.0 <= v <= 1.0]
    if aug.mixup + aug.cutmix > 1.0:
        problems.append(f"data.augment.mixup + cutmix = {aug.mixup + aug.cutmix}: a batch is one or the other, "
                        "so the two probabilities must add up to at most 1")
    if aug.mixup_alpha <= 0 or aug.cutmix_alpha <= 0:
        problems.append("data.augment.mixup_alpha and cutmix_alpha: expected values > 0")
    if not 0.0 <= aug.rotate_degrees <= 180.0:
        problems.append(f"data.augment.rotate_degrees={aug.rotate_degrees}: expected 0 <= value <= 180")
    if not 0.0 < config.data.repeat_thresh <= 1.0:
        problems.append(f"data.repeat_thresh={config.data.repeat_thresh}: expected 0 < value <= 1")
    return problems


def _distill_problems(config: Config) -> list[str]:
    """Problems of the task choice and the teacher and distill sections."""
    teacher, distill, problems = config.teacher, config.distill, []
    weights = {"supervised": distill.supervised, "kl": distill.kl, "feature": distill.feature}
    problems += [f"distill.{k}={v}: expected a weight >= 0" for k, v in weights.items() if v < 0]
    if distill.temperature <= 0:
        problems.append(f"distill.temperature={distill.temperature}: expected a value > 0")
    if teacher.bootstrap is not None and (teacher.bootstrap.max_steps <= 0 or teacher.bootstrap.lr <= 0):
        problems.append(f"teacher.bootstrap={teacher.bootstrap}: expected max_steps > 0 and lr > 0")
    # teacher.path is checked where the teacher is loaded (recipes leave it to --set, like data.root).
    if config.task == "distill" and distill.kl <= 0 and distill.feature <= 0:
        problems.append("task=distill with distill.kl and distill.feature both 0: nothing to distil")
    return problems


def save_resolved(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (a file that ``--config`` accepts back)."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
