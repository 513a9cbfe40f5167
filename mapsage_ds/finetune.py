"""Fine-tuning, composed top to bottom: config -> device -> data -> model -> engine -> loop -> export."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from mapsage_ds.accelerator import DistributedContext
from mapsage_ds.config import Config, DataConfig, save_resolved, to_dict
from mapsage_ds.data.classes import IGNORE_INDEX, LOVEDA_CLASSES
from mapsage_ds.data.hf_source import HFSegmentationDataset
from mapsage_ds.data.loaders import TrainSampler, TrainStream, TransformedDataset
from mapsage_ds.data.loveda import LoveDA
from mapsage_ds.data.synthetic import SyntheticSpec, ensure_synthetic_tree
from mapsage_ds.data.transforms import EvalTransform, Normalize, TrainTransform
from mapsage_ds.engine import (average_buffers, build_optimizer, compute_dtype, fill_ds_config, initialize_engine,
                               read_ds_config, zero_stage)
from mapsage_ds.evaluation import evaluate
from mapsage_ds.export import export_model
from mapsage_ds.metrics import SegmentationMetrics
from mapsage_ds.models import build_model
from mapsage_ds.optim import LRSchedule, build_param_groups
from mapsage_ds.run_log import RunLogger
from mapsage_ds.tasks import SegmentationTask
from mapsage_ds.trainer import Trainer


def prepare_data_root(data: DataConfig, ctx: DistributedContext) -> None:
    """Generate the synthetic tree once (rank 0) when the config asks for one."""
    if data.synthetic is not None and ctx.is_main:
        ensure_synthetic_tree(data.root, SyntheticSpec(**asdict(data.synthetic)))
    dist.barrier()


def build_dataset(data: DataConfig, split: str) -> Dataset:
    """The raw (untransformed) dataset of ``split`` from the configured source."""
    if data.source == "hf":
        return HFSegmentationDataset(data.root, split=split, image_column=data.hf_image_column,
                                     mask_column=data.hf_mask_column, mask_encoding=data.hf_mask_encoding)
    return LoveDA(data.root, split, scenes=data.scenes)


def run_finetune(config: Config, ctx: DistributedContext, *, resume: bool = False) -> SegmentationMetrics:
    """Train, evaluate and export as ``config`` says; returns the final validation metrics."""
    output_dir = Path(config.output_dir)
    if ctx.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(config, output_dir / "config.yaml")
    torch.manual_seed(config.train.seed + ctx.rank)
    class_names = list(LOVEDA_CLASSES)

    prepare_data_root(config.data, ctx)
    normalize = Normalize()  # SegFormer's MiT encoders are ImageNet-pretrained
    train_data = TransformedDataset(
        build_dataset(config.data, config.data.train_split),
        TrainTransform(crop_size=config.data.crop_size, hflip=config.data.hflip, normalize=normalize),
        seed=config.train.seed,
    )
    val_data = TransformedDataset(build_dataset(config.data, config.data.val_split),
                                  EvalTransform(normalize), seed=config.train.seed)
    sampler = TrainSampler(len(train_data), rank=ctx.rank, world_size=ctx.world_size,
                           batch_size=config.train.micro_batch_size, seed=config.train.seed)
    stream = TrainStream(train_data, sampler, num_workers=config.data.num_workers)

    model, report = build_model(arch=config.model.arch, size=config.model.size, class_names=class_names,
                                pretrained=config.model.pretrained)
    if report is not None and ctx.is_main:
        print(report.summary(), flush=True)

    ds_config = fill_ds_config(
        read_ds_config(config.train.deepspeed), micro_batch_size=config.train.micro_batch_size,
        grad_accum_steps=config.train.grad_accum_steps, world_size=ctx.world_size, grad_clip=config.optim.grad_clip,
    )
    # Cast before initialize: DeepSpeed casts parameters but not buffers (BatchNorm statistics).
    task = SegmentationTask(model, ignore_index=IGNORE_INDEX).to(ctx.device, compute_dtype(ds_config))
    param_groups = build_param_groups(task.named_parameters(), weight_decay=config.optim.weight_decay)
    optimizer = build_optimizer(param_groups, lr=config.optim.lr, betas=config.optim.betas, eps=config.optim.eps)
    engine = initialize_engine(task, optimizer, ds_config)
    stage = zero_stage(ds_config)
    schedule = LRSchedule(
        base_lr=config.optim.lr, total_steps=config.train.max_steps, kind=config.optim.schedule,
        warmup_steps=config.optim.warmup_steps, warmup_start_factor=config.optim.warmup_start_factor,
        min_lr_ratio=config.optim.min_lr_ratio, poly_power=config.optim.poly_power,
    )
    export_metadata = {"image_mean": normalize.mean, "image_std": normalize.std, "run_config": to_dict(config)}

    def validate() -> SegmentationMetrics:
        average_buffers(task)
        return evaluate(task, val_data, device=ctx.device, rank=ctx.rank, world_size=ctx.world_size,
                        class_names=class_names, ignore_index=IGNORE_INDEX, batch_size=config.eval.batch_size,
                        max_images=config.eval.max_images)

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
    )
    if resume:
        trainer.resume()
    logger.message(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
                   f"{ctx.world_size} process(es) on {ctx.device.type}, ZeRO-{stage}, {compute_dtype(ds_config)}")
    trainer.fit()
    metrics = validate()
    logger.close()
    average_buffers(task)
    export_model(model, output_dir / "export", stage=stage, is_main=ctx.is_main, **export_metadata)
    if ctx.is_main:
        _write_json(output_dir / "export" / "metrics.json", {"step": trainer.state.step, **metrics.to_dict()})
        print(metrics.format_table(), flush=True)
        print(f"exported to {output_dir / 'export'} (best: step {trainer.state.best_step}, "
              f"mIoU {trainer.state.best_miou:.4f} in {output_dir / 'best'})", flush=True)
    engine.destroy()
    return metrics


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=float))
