"""Builders: the only place where a run's :class:`~mapsage_ds.config.Config` becomes library objects.

Each builder reads one or two config sections and calls library code with typed keyword
arguments; training, distillation, the dry run and the health checks share them, so a config
means the same thing to all of them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from mapsage_ds.config import (
    Config,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    UnfreezeConfig,
    read_recipe,
    recipe_names,
)
from mapsage_ds.data.classes import IGNORE_INDEX
from mapsage_ds.data.loaders import TrainSampler, TrainStream, TransformedDataset
from mapsage_ds.data.loveda import LoveDA
from mapsage_ds.data.mixing import MixCollate
from mapsage_ds.data.samplers import BatchCropSizes, ClassAwareSampler, class_presence, repeat_factors
from mapsage_ds.data.synthetic import MARKER_NAME, ensure_synthetic_tree
from mapsage_ds.data.transforms import Normalize, TrainTransform
from mapsage_ds.data.validation import ValidationReport, default_cache_dir, validate_dataset, validation_error
from mapsage_ds.errors import ConfigError, MapSageError, StorageError, on_every_rank
from mapsage_ds.losses import CompositeLoss, build_loss
from mapsage_ds.models import build_model
from mapsage_ds.models.factory import BuiltModel
from mapsage_ds.optim.param_groups import layer_decay_scale
from mapsage_ds.optim.unfreeze import UnfreezePlan
from mapsage_ds.planning.plan import MemoryPlan, plan_for_run
from mapsage_ds.runtime.accelerator import DistributedContext
from mapsage_ds.runtime.engine import EngineBuilder, fill_ds_config, fill_zero_comm, read_ds_config
from mapsage_ds.runtime.failures import raise_if_any_failed


def data_root(data: DataConfig) -> str:
    """``data.root``, which every command that reads data needs (the dry run and the planner do not)."""
    if data.root is None:
        raise ConfigError("data.root is not set: pass --data-root or --set data.root=PATH")
    return data.root


def prepare_data_root(data: DataConfig, ctx: DistributedContext) -> None:
    """Collective: generate the synthetic tree once (rank 0) when the config asks for one.

    Generated data is written only at the ``data.root`` of a packaged recipe that generates its
    data, or anywhere with ``data.generate`` (``--generate-data``): a mistyped ``--data-root``
    must fail, not quietly become a new dataset. A complete generated tree is used wherever it is.

    Raises:
        ConfigError: On rank 0, when ``data.root`` holds no generated tree and is no recipe's own
            root (other ranks raise ``FailedOnAnotherRank``), or when ``ensure_synthetic_tree``
            refuses the root.
    """
    root = data_root(data)
    error = None
    if data.synthetic is not None and ctx.is_main:
        try:
            check_generation_root(data)
            ensure_synthetic_tree(root, data.synthetic)
        except MapSageError as failure:
            error = failure
        except OSError as failure:
            error = StorageError(f"generating the synthetic tree at {root} failed: {failure}")
    # Also the barrier: the other ranks read the tree only once rank 0 has written it.
    raise_if_any_failed(error)


def check_generation_root(data: DataConfig) -> None:
    """Raise unless ``data.synthetic`` may be generated at ``data.root`` (or a generated tree is there already).

    Raises:
        ConfigError: If ``data.root`` holds no generated tree, ``data.generate`` is off and no packaged
            recipe that generates its data names this root.
    """
    root = data_root(data)
    if data.synthetic is None or data.generate or (Path(root) / MARKER_NAME).is_file():
        return
    # A recipe's relative root means the current directory, as the run itself reads it.
    recipe_roots: dict[str, list[str]] = {}
    for name in recipe_names():
        recipe_data = read_recipe(name).get("data") or {}
        if recipe_data.get("synthetic") is not None and recipe_data.get("root"):
            recipe_roots.setdefault(str(recipe_data["root"]), []).append(name)
    if Path(root).resolve() in {Path(r).resolve() for r in recipe_roots}:
        return
    defaults = "; ".join(f"{r} (recipe {', '.join(names)})" for r, names in recipe_roots.items()) or "none"
    raise ConfigError(
        f"data.root={root} holds no generated LoveDA tree (no {MARKER_NAME}), and data.synthetic generates its data "
        f"only at the recipe's own data.root: {defaults}. Pass --generate-data (data.generate=true) to generate it at "
        f"{root}, or --set data.synthetic=null to train on data that is already there"
    )


def validate_data(data: DataConfig, ctx: DistributedContext) -> list[ValidationReport]:
    """Collective: decode every image and mask of the train and val splits before training.

    Ranks share the work; files that passed before and did not change since are skipped
    (:mod:`mapsage_ds.data.validation`). Nothing happens when ``data.validate`` is false.

    Returns:
        One report per split (none when validation is off).

    Raises:
        DataError: On rank 0, listing every broken file of both splits (other ranks raise
            ``FailedOnAnotherRank``).
    """
    if not data.validate:
        return []
    reports = [validate_dataset(build_dataset(data, split), cache_dir=default_cache_dir(), rank=ctx.rank,
                                world_size=ctx.world_size, progress=ctx.is_main)
               for split in dict.fromkeys((data.train_split, data.val_split))]
    error = validation_error(reports)
    # Every rank holds the same report: the message names the broken files of all ranks, printed once.
    raise_if_any_failed(None if error is None else on_every_rank(error))
    return reports


def build_dataset(data: DataConfig, split: str) -> Dataset:
    """The raw (untransformed) dataset of ``split`` from the configured source."""
    if data.source == "hf":
        from mapsage_ds.data.hf_source import HFSegmentationDataset  # imports `datasets` only when used

        return HFSegmentationDataset(data_root(data), split=split, image_column=data.hf_image_column,
                                     mask_column=data.hf_mask_column, mask_encoding=data.hf_mask_encoding)
    return LoveDA(data_root(data), split, scenes=data.scenes)


def build_train_transform(data: DataConfig, normalize: Normalize) -> TrainTransform:
    """The per-sample training augmentation ``data`` and ``data.augment`` describe."""
    aug = data.augment
    return TrainTransform(crop_size=data.crop_size, hflip=data.hflip, normalize=normalize,
                          scale_range=tuple(aug.scale_range), vflip=aug.vflip, rot90=aug.rot90,
                          rotate_degrees=aug.rotate_degrees, rotate_prob=aug.rotate_prob, color_jitter=aug.color_jitter)


def build_train_stream(data: DataConfig, train_data: TransformedDataset, ctx: DistributedContext, *,
                       batch_size: int, seed: int, num_classes: int) -> TrainStream:
    """Sampler (uniform or class-aware, optionally one crop size per batch) and batch mixing.

    Batches are pinned for an accelerator (asynchronous host-to-device copies), not for CPU training.
    """
    aug = data.augment
    shard = dict(rank=ctx.rank, world_size=ctx.world_size, batch_size=batch_size, seed=seed)
    if data.sampler == "class_aware":
        presence = class_presence(train_data.base, num_classes=num_classes, num_workers=data.num_workers)
        sampler = ClassAwareSampler(repeat_factors(presence, thresh=data.repeat_thresh), **shard)
    else:
        sampler = TrainSampler(len(train_data), **shard)
    if aug.crop_sizes:
        sampler = BatchCropSizes(sampler, aug.crop_sizes)
    collate = (MixCollate(mixup=aug.mixup, cutmix=aug.cutmix, mixup_alpha=aug.mixup_alpha,
                          cutmix_alpha=aug.cutmix_alpha) if aug.mixup > 0 or aug.cutmix > 0 else None)
    return TrainStream(train_data, sampler, num_workers=data.num_workers, collate_fn=collate,
                       pin_memory=ctx.device.type != "cpu")


def build_task_loss(loss: LossConfig, *, num_classes: int) -> CompositeLoss:
    """The composite loss of the ``loss`` section."""
    return build_loss(ce=loss.ce, dice=loss.dice, lovasz=loss.lovasz, boundary=loss.boundary,
                      class_weights=loss.class_weights, label_smoothing=loss.label_smoothing,
                      ohem_thresh=None if loss.ohem is None else loss.ohem.thresh,
                      ohem_min_kept=100_000 if loss.ohem is None else loss.ohem.min_kept,
                      boundary_radius=loss.boundary_radius, ignore_index=IGNORE_INDEX, num_classes=num_classes)


def unfreeze_plan(config: UnfreezeConfig | None) -> UnfreezePlan:
    """The run's unfreezing plan (nothing frozen when the config has none)."""
    if config is None:
        return UnfreezePlan()
    return UnfreezePlan(config.initial_frozen_fraction, tuple((s.at_step, s.frozen_fraction) for s in config.stages))


def build_ds_config(train: TrainConfig, optim: OptimConfig, *, world_size: int, accelerator: str,
                    micro_batch_size: int | None = None, grad_accum_steps: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config ``train.deepspeed`` names, filled from the run's batch geometry.

    ZeRO's communication settings the config does not state are ``accelerator``'s
    (:func:`~mapsage_ds.runtime.engine.fill_zero_comm`: on for cards, off for ``cpu``).
    """
    filled = fill_ds_config(
        read_ds_config(train.deepspeed), world_size=world_size, grad_clip=optim.grad_clip,
        micro_batch_size=train.micro_batch_size if micro_batch_size is None else micro_batch_size,
        grad_accum_steps=train.grad_accum_steps if grad_accum_steps is None else grad_accum_steps,
    )
    return fill_zero_comm(filled, accelerator=accelerator)


FROM_SCRATCH = "none"  # model.pretrained: training from random weights is intended (null: nothing said)


def starting_weights(model: ModelConfig) -> str | None:
    """The local weights ``model.pretrained`` names; None for null and for ``none`` (from scratch, on purpose)."""
    return None if model.pretrained in (None, FROM_SCRATCH) else model.pretrained


def random_start_warning(config: Config) -> str | None:
    """The start-up warning of a run on real data that names no starting weights (None when there is nothing to say).

    Generated data (``data.synthetic``) and ``model.pretrained: none`` (training from scratch on
    purpose) say nothing; a forgotten ``--set model.pretrained=...`` would otherwise cost a whole
    run on random weights without a word.
    """
    if config.model.pretrained is not None or config.data.synthetic is not None:
        return None
    return (f"WARNING: model.pretrained is not set: the {config.model.arch} '{config.model.size}' network starts "
            f"from RANDOM weights. Set model.pretrained=/path/to/local/weights (docs/weights.md), or "
            f"model.pretrained={FROM_SCRATCH} if training from scratch is intended.")


def build_run_model(config: Config, class_names: list[str], *, ds_config: dict[str, Any] | None = None,
                    pretrained: bool = True, verbose: bool = False) -> BuiltModel:
    """The network of ``config.model`` (with its local starting weights unless ``pretrained=False``).

    ``verbose`` prints the weights' key report and the normalisation decision (pass it on rank 0),
    and, loudly on stderr, :func:`random_start_warning` when no starting weights are named.
    """
    model = config.model
    if verbose and pretrained and (warning := random_start_warning(config)) is not None:
        rule = "!" * 100
        print(f"{rule}\n{warning}\n{rule}", file=sys.stderr, flush=True)
    return build_model(arch=model.arch, size=model.size, class_names=class_names,
                       pretrained=starting_weights(model) if pretrained else None, ds_config=ds_config,
                       drop_path_rate=model.drop_path_rate, normalization=model.normalization, head=model.head,
                       head_channels=model.head_channels, head_norm=model.head_norm, verbose=verbose)


def lr_scales(optim: OptimConfig, built: BuiltModel, *, model_prefix: str = "model."):
    """Layer-decay learning-rate multiplier per parameter name."""
    return layer_decay_scale(layer_id=built.layer_id, num_layers=built.num_layers, layer_decay=optim.layer_decay,
                             backbone_lr_mult=optim.backbone_lr_mult, model_prefix=model_prefix)


def build_engine_builder(config: Config, task: nn.Module, built: BuiltModel, ds_config: dict[str, Any], *,
                         verbose: bool) -> EngineBuilder:
    """The engine life cycle (freeze, groups, optimizer, initialize, state carry-over) of this run."""
    optim = config.optim
    return EngineBuilder(task=task, ds_config=ds_config, layer_id=built.layer_id, num_layers=built.num_layers,
                         unfreeze=unfreeze_plan(config.unfreeze), lr=optim.lr, betas=optim.betas, eps=optim.eps,
                         weight_decay=optim.weight_decay, lr_scale_of=lr_scales(optim, built), verbose=verbose)


def build_meta_model(config: Config, class_names: list[str]) -> BuiltModel:
    """The run's network on the meta device: shapes only, nothing allocated, no weights read."""
    with torch.device("meta"):
        return build_run_model(config, class_names, pretrained=False)


def build_memory_plan(config: Config, built: BuiltModel, *, cards: int, card_memory: int, margin: float | None = None,
                      overhead: int | None = None, host_memory: int | None = None) -> MemoryPlan:
    """The memory plan of ``config`` on ``cards`` cards, for a model from :func:`build_meta_model`."""
    extra = {k: v for k, v in dict(margin=margin, overhead=overhead).items() if v is not None}
    plan = plan_for_run(
        built=built, ds_config=read_ds_config(config.train.deepspeed), unfreeze=unfreeze_plan(config.unfreeze),
        weight_decay=config.optim.weight_decay, lr_scale_of=lr_scales(config.optim, built, model_prefix=""),
        # Multi-scale training peaks at its largest crop.
        micro_batch_size=config.train.micro_batch_size, crop_size=max([config.data.crop_size,
                                                                       *config.data.augment.crop_sizes]),
        activation_checkpointing=config.train.activation_checkpointing,
        model_name=f"{config.model.arch} {config.model.size}", cards=cards, card_memory=card_memory,
        host_memory=host_memory, **extra,
    )
    if starting_weights(config.model) is not None:
        plan.notes.append(f"sizes come from the '{config.model.size}' preset, not from {config.model.pretrained}")
    return plan
