"""Fine-tuning, composed top to bottom: config -> device -> data -> model -> engine -> loop -> export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from mapsage_ds import checkpoint
from mapsage_ds.accelerator import DistributedContext
from mapsage_ds.config import Config, DataConfig, LossConfig, UnfreezeConfig, save_resolved, to_dict
from mapsage_ds.data.classes import IGNORE_INDEX, LOVEDA_CLASSES
from mapsage_ds.data.hf_source import HFSegmentationDataset
from mapsage_ds.data.loaders import TrainSampler, TrainStream, TransformedDataset
from mapsage_ds.data.loveda import LoveDA
from mapsage_ds.data.mixing import MixCollate
from mapsage_ds.data.samplers import BatchCropSizes, ClassAwareSampler, class_presence, repeat_factors
from mapsage_ds.data.synthetic import ensure_synthetic_tree
from mapsage_ds.data.transforms import Normalize, TrainTransform
from mapsage_ds.engine import (
    average_buffers,
    build_optimizer,
    compute_dtype,
    fill_ds_config,
    initialize_engine,
    read_ds_config,
    zero_stage,
)
from mapsage_ds.evaluation import evaluate
from mapsage_ds.export import export_model
from mapsage_ds.inference import InferenceProtocol, Predictor
from mapsage_ds.losses import CompositeLoss, build_loss
from mapsage_ds.metrics import SegmentationMetrics
from mapsage_ds.models import build_model
from mapsage_ds.models.factory import enable_activation_checkpointing
from mapsage_ds.models.heads import build_boundary_head
from mapsage_ds.optim import LRSchedule, build_param_groups
from mapsage_ds.optim.param_groups import layer_decay_scale
from mapsage_ds.run_log import RunLogger
from mapsage_ds.tasks import build_task, finish_task
from mapsage_ds.trainer import Trainer
from mapsage_ds.unfreeze import UnfreezePlan, capture_trainable_state, restore_trainable_state, set_frozen


def prepare_data_root(data: DataConfig, ctx: DistributedContext) -> None:
    """Generate the synthetic tree once (rank 0) when the config asks for one."""
    if data.synthetic is not None and ctx.is_main:
        ensure_synthetic_tree(data.root, data.synthetic)
    dist.barrier()


def build_dataset(data: DataConfig, split: str) -> Dataset:
    """The raw (untransformed) dataset of ``split`` from the configured source."""
    if data.source == "hf":
        return HFSegmentationDataset(data.root, split=split, image_column=data.hf_image_column,
                                     mask_column=data.hf_mask_column, mask_encoding=data.hf_mask_encoding)
    return LoveDA(data.root, split, scenes=data.scenes)


def build_train_transform(data: DataConfig, normalize: Normalize) -> TrainTransform:
    """The per-sample training augmentation ``data`` and ``data.augment`` describe."""
    aug = data.augment
    return TrainTransform(crop_size=data.crop_size, hflip=data.hflip, normalize=normalize,
                          scale_range=tuple(aug.scale_range), vflip=aug.vflip, rot90=aug.rot90,
                          rotate_degrees=aug.rotate_degrees, rotate_prob=aug.rotate_prob, color_jitter=aug.color_jitter)


def build_train_stream(data: DataConfig, train_data: TransformedDataset, ctx: DistributedContext, *,
                       batch_size: int, seed: int, num_classes: int) -> TrainStream:
    """Sampler (uniform or class-aware, optionally one crop size per batch) and batch mixing."""
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
    return TrainStream(train_data, sampler, num_workers=data.num_workers, collate_fn=collate)


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


def run_finetune(config: Config, ctx: DistributedContext, *, resume: bool = False) -> SegmentationMetrics:
    """Train, evaluate and export as ``config`` says; returns the final validation metrics."""
    output_dir = Path(config.output_dir)
    if ctx.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(config, output_dir / "config.yaml")
    torch.manual_seed(config.train.seed + ctx.rank)
    class_names = list(LOVEDA_CLASSES)

    ds_config = fill_ds_config(
        read_ds_config(config.train.deepspeed), micro_batch_size=config.train.micro_batch_size,
        grad_accum_steps=config.train.grad_accum_steps, world_size=ctx.world_size, grad_clip=config.optim.grad_clip,
    )
    stage = zero_stage(ds_config)
    built = build_model(arch=config.model.arch, size=config.model.size, class_names=class_names,
                        pretrained=config.model.pretrained, ds_config=ds_config,
                        drop_path_rate=config.model.drop_path_rate)
    model, normalize = built.module, built.normalize
    if config.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    if built.report is not None and ctx.is_main:
        print(built.report.summary(), flush=True)

    prepare_data_root(config.data, ctx)
    train_data = TransformedDataset(build_dataset(config.data, config.data.train_split),
                                    build_train_transform(config.data, normalize), seed=config.train.seed)
    # Raw uint8 images: the predictor normalises them, exactly as scripts/evaluate.py does.
    val_data = build_dataset(config.data, config.data.val_split)
    stream = build_train_stream(config.data, train_data, ctx, batch_size=config.train.micro_batch_size,
                                seed=config.train.seed, num_classes=len(class_names))

    # Cast before initialize: DeepSpeed casts parameters but not buffers (BatchNorm statistics).
    # The boundary head sits beside `model` in the task: trained, never exported.
    # The task is picked by name (config.task); a distillation task's frozen teacher stays outside it.
    task = build_task(
        config, model, normalize=normalize, ignore_index=IGNORE_INDEX,
        loss=build_task_loss(config.loss, num_classes=len(class_names)),
        boundary_head=build_boundary_head(model) if config.model.boundary_head else None,
        stream=stream, ctx=ctx, dtype=compute_dtype(ds_config),
    ).to(ctx.device, compute_dtype(ds_config))
    plan = unfreeze_plan(config.unfreeze)
    lr_scale_of = layer_decay_scale(layer_id=built.layer_id, num_layers=built.num_layers,
                                    layer_decay=config.optim.layer_decay,
                                    backbone_lr_mult=config.optim.backbone_lr_mult)

    def make_engine(step: int, previous: deepspeed.DeepSpeedEngine | None = None) -> deepspeed.DeepSpeedEngine:
        """Engine whose trainable set is the plan's at ``step``; carries state over from ``previous``."""
        captured = None
        if previous is not None:
            captured = capture_trainable_state(previous, task, stage=stage)
            previous.destroy()
        frozen = set_frozen(task.named_parameters(), layer_id=built.layer_id, num_layers=built.num_layers,
                            fraction=plan.frozen_fraction(step))
        groups = build_param_groups(task.named_parameters(), weight_decay=config.optim.weight_decay,
                                    lr_scale_of=lr_scale_of)
        optimizer = build_optimizer(groups, lr=config.optim.lr, betas=config.optim.betas, eps=config.optim.eps)
        engine = initialize_engine(task, optimizer, ds_config)
        if captured is not None:
            restore_trainable_state(engine, task, captured, stage=stage, step=step)
        if ctx.is_main:
            trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                            for p in task.parameters() if p.requires_grad)
            print(f"step {step}: {len(frozen)} frozen tensors, {trainable / 1e6:.2f} M trainable parameters "
                  f"in {len(groups)} groups", flush=True)
        return engine

    start_step = checkpoint.latest_step(output_dir / "checkpoints") if resume else 0
    # A checkpoint at step s was written by the engine that ran step s - 1; the loop rebuilds at s.
    engine = make_engine(max(start_step - 1, 0))
    schedule = LRSchedule(
        base_lr=config.optim.lr, total_steps=config.train.max_steps, kind=config.optim.schedule,
        warmup_steps=config.optim.warmup_steps, warmup_start_factor=config.optim.warmup_start_factor,
        min_lr_ratio=config.optim.min_lr_ratio, poly_power=config.optim.poly_power,
    )
    export_metadata = {"image_mean": normalize.mean, "image_std": normalize.std, "run_config": to_dict(config)}

    predictor = Predictor(task.predict, normalize=normalize, protocol=InferenceProtocol.from_eval_config(config.eval),
                          module=task)

    def validate() -> SegmentationMetrics:
        average_buffers(task)
        return evaluate(predictor, val_data, device=ctx.device, rank=ctx.rank, world_size=ctx.world_size,
                        class_names=class_names, ignore_index=IGNORE_INDEX, batch_size=config.eval.batch_size,
                        max_images=config.eval.max_images, boundary_width=config.eval.boundary_width,
                        boundary_dilation_ratio=config.eval.boundary_dilation_ratio)

    def export_best(step: int, metrics: SegmentationMetrics) -> None:
        average_buffers(task)
        export_model(model, output_dir / "best", stage=stage, is_main=ctx.is_main, **export_metadata)
        if ctx.is_main:
            _write_json(output_dir / "best" / "metrics.json", {"step": step, **metrics.to_dict()})

    logger = RunLogger(output_dir, enabled=ctx.is_main, total_steps=config.train.max_steps)
    trainer = Trainer(
        engine=engine, schedule=schedule, stream=stream, evaluate=validate, on_new_best=export_best, ctx=ctx,
        checkpoint_dir=output_dir / "checkpoints", logger=logger, max_steps=config.train.max_steps,
        grad_accum_steps=config.train.grad_accum_steps, eval_every=config.train.eval_every,
        save_every=config.train.save_every, log_every=config.train.log_every,
        keep_checkpoints=config.train.keep_checkpoints, client_config=to_dict(config),
        unfreeze_plan=plan, rebuild_engine=make_engine,
    )
    if resume:
        trainer.resume()
    logger.message(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
                   f"{ctx.world_size} process(es) on {ctx.device.type}, ZeRO-{stage}, {compute_dtype(ds_config)}")
    trainer.fit()
    finish_task(task, output_dir=output_dir, is_main=ctx.is_main)
    metrics = validate()
    logger.close()
    average_buffers(task)
    export_model(model, output_dir / "export", stage=stage, is_main=ctx.is_main, **export_metadata)
    if ctx.is_main:
        _write_json(output_dir / "export" / "metrics.json", {"step": trainer.state.step, **metrics.to_dict()})
        print(metrics.format_table(), flush=True)
        print(f"exported to {output_dir / 'export'} (best: step {trainer.state.best_step}, "
              f"mIoU {trainer.state.best_miou:.4f} in {output_dir / 'best'})", flush=True)
    trainer.engine.destroy()
    return metrics


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=float))
