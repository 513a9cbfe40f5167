"""A training run, composed top to bottom: config -> device -> model -> data -> task -> engine -> loop -> export."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from mapsage_ds.builders import (
    build_dataset,
    build_ds_config,
    build_engine_builder,
    build_run_model,
    build_task_loss,
    build_train_stream,
    build_train_transform,
    prepare_data_root,
    unfreeze_plan,
    validate_data,
)
from mapsage_ds.config import Config, save_resolved, to_dict
from mapsage_ds.data.classes import IGNORE_INDEX, LOVEDA_CLASSES
from mapsage_ds.data.loaders import TransformedDataset
from mapsage_ds.errors import MapSageError
from mapsage_ds.evaluation.loop import run_evaluation
from mapsage_ds.evaluation.metrics import SegmentationMetrics
from mapsage_ds.evaluation.predictor import Predictor
from mapsage_ds.files import write_json
from mapsage_ds.models.export import export_model
from mapsage_ds.models.factory import enable_activation_checkpointing
from mapsage_ds.models.heads import build_boundary_head
from mapsage_ds.optim import LRSchedule
from mapsage_ds.runtime import checkpoint
from mapsage_ds.runtime.accelerator import DistributedContext
from mapsage_ds.runtime.engine import average_buffers, compute_dtype, zero_stage
from mapsage_ds.runtime.failures import raise_if_any_failed
from mapsage_ds.tasks import build_task, finish_task
from mapsage_ds.training.run_dir import OwnedRunDirectory, claim_output_dir
from mapsage_ds.training.run_log import RunLogger
from mapsage_ds.training.trainer import NonFinitePolicy, Trainer


def _broadcast(value: object) -> object:
    """Rank 0's ``value`` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_finetune(config: Config, ctx: DistributedContext, *, resume: bool = False,
                 overwrite: bool = False) -> SegmentationMetrics:
    """Train, evaluate and export as ``config`` says; returns the final validation metrics.

    The output directory is held for the whole run (:func:`claim_run_directory`); ``resume``
    continues the run it holds, ``overwrite`` replaces it.
    """
    owned = claim_run_directory(Path(config.output_dir), ctx, resume=resume, overwrite=overwrite)
    try:
        return _run(config, ctx, owned, resume=resume)
    finally:
        if owned is not None:
            owned.release()


def claim_run_directory(output_dir: Path, ctx: DistributedContext, *, resume: bool,
                        overwrite: bool) -> OwnedRunDirectory | None:
    """Rank 0 locks ``output_dir`` and checks whose outputs it holds; every rank stops if that fails.

    Returns the held directory on rank 0 and None elsewhere. On resume, checkpoint folders an
    interrupted save left behind are removed and ``metrics.jsonl`` is cut back later, when the
    logger opens it.
    """
    owned, error = None, None
    if ctx.is_main:
        try:
            owned = claim_output_dir(output_dir, resume=resume, overwrite=overwrite)
            for note in owned.notes:
                print(note, flush=True)
            if resume:
                for folder in checkpoint.remove_incomplete(output_dir / "checkpoints"):
                    print(f"removed {folder}: an incomplete checkpoint left by an interrupted save", flush=True)
        except MapSageError as failure:
            error = failure
    raise_if_any_failed(error)
    return owned


def _run(config: Config, ctx: DistributedContext, owned: OwnedRunDirectory | None, *,
         resume: bool) -> SegmentationMetrics:
    output_dir = Path(config.output_dir)
    run_id = _broadcast(owned.run_id if owned else None)
    if ctx.is_main:
        save_resolved(config, output_dir / "config.yaml")
    torch.manual_seed(config.train.seed + ctx.rank)
    class_names = list(LOVEDA_CLASSES)

    ds_config = build_ds_config(config.train, config.optim, world_size=ctx.world_size, accelerator=ctx.accelerator)
    stage = zero_stage(ds_config)
    built = build_run_model(config, class_names, ds_config=ds_config, verbose=ctx.is_main)
    model, normalize = built.module, built.normalize
    if config.train.activation_checkpointing:
        enable_activation_checkpointing(model)

    prepare_data_root(config.data, ctx)
    validate_data(config.data, ctx)
    train_data = TransformedDataset(build_dataset(config.data, config.data.train_split),
                                    build_train_transform(config.data, normalize), seed=config.train.seed)
    # Raw uint8 images: the predictor normalises them, exactly as mapsage-evaluate does.
    val_data = build_dataset(config.data, config.data.val_split)
    stream = build_train_stream(config.data, train_data, ctx, batch_size=config.train.micro_batch_size,
                                seed=config.train.seed, num_classes=len(class_names))

    # Cast before initialize: DeepSpeed casts parameters but not buffers (BatchNorm statistics).
    # The boundary head sits beside `model` in the task: trained, never exported.
    # The task is picked by name (config.task); a distillation task's frozen teacher stays outside it.
    task = build_task(
        config.task, model, teacher=config.teacher, distill=config.distill, seed=config.train.seed,
        cache_dir=Path(config.teacher.cache_dir or output_dir / "teacher_cache"),
        cache_key={"data": to_dict(config.data), "seed": config.train.seed,
                   "micro_batch_size": config.train.micro_batch_size},
        num_batches=config.train.max_steps * config.train.grad_accum_steps,
        normalize=normalize, ignore_index=IGNORE_INDEX,
        loss=build_task_loss(config.loss, num_classes=len(class_names)),
        boundary_head=build_boundary_head(model) if config.model.boundary_head else None,
        stream=stream, ctx=ctx, dtype=compute_dtype(ds_config),
    ).to(ctx.device, compute_dtype(ds_config))
    engines = build_engine_builder(config, task, built, ds_config, verbose=ctx.is_main)

    start_step = checkpoint.latest_step(output_dir / "checkpoints") if resume else 0
    # A checkpoint at step s was written by the engine that ran step s - 1; the loop rebuilds at s.
    engine = engines.build(max(start_step - 1, 0))
    schedule = LRSchedule(
        base_lr=config.optim.lr, total_steps=config.train.max_steps, kind=config.optim.schedule,
        warmup_steps=config.optim.warmup_steps, warmup_start_factor=config.optim.warmup_start_factor,
        min_lr_ratio=config.optim.min_lr_ratio, poly_power=config.optim.poly_power,
    )
    export_metadata = {"image_mean": normalize.mean, "image_std": normalize.std, "run_config": to_dict(config)}
    predictor = Predictor(task.predict, normalize=normalize, protocol=config.eval, module=task)

    def validate() -> SegmentationMetrics:
        average_buffers(task)
        return run_evaluation(predictor, val_data, protocol=config.eval, device=ctx.device, rank=ctx.rank,
                              world_size=ctx.world_size, class_names=class_names, ignore_index=IGNORE_INDEX).metrics

    def export_to(name: str, step: int, metrics: SegmentationMetrics) -> None:
        average_buffers(task)
        export_model(model, output_dir / name, stage=stage, is_main=ctx.is_main, **export_metadata)
        if ctx.is_main:
            write_json(output_dir / name / "metrics.json", {"step": step, **metrics.to_dict()})

    logger = RunLogger(output_dir, enabled=ctx.is_main, total_steps=config.train.max_steps,
                       resumed_step=start_step if resume else None)
    trainer = Trainer(
        engine=engine, schedule=schedule, stream=stream, evaluate=validate,
        on_new_best=lambda step, metrics: export_to("best", step, metrics), ctx=ctx,
        checkpoint_dir=output_dir / "checkpoints", logger=logger, max_steps=config.train.max_steps,
        grad_accum_steps=config.train.grad_accum_steps, eval_every=config.train.eval_every,
        save_every=config.train.save_every, log_every=config.train.log_every,
        keep_checkpoints=config.train.keep_checkpoints, client_config=to_dict(config),
        unfreeze_plan=unfreeze_plan(config.unfreeze), rebuild_engine=engines.build, run_id=run_id,
        nonfinite=NonFinitePolicy(on_nonfinite=config.train.nonfinite, max_skipped_share=config.train.max_skipped_share,
                                  window=config.train.skip_window,
                                  loss_scaling=compute_dtype(ds_config) == torch.float16),
    )
    if resume:
        trainer.resume()
    logger.message(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
                   f"{ctx.world_size} process(es) on {ctx.device.type}, ZeRO-{stage}, {compute_dtype(ds_config)}")
    trainer.fit()
    finish_task(task, output_dir=output_dir, is_main=ctx.is_main)
    metrics = validate()
    logger.close()
    export_to("export", trainer.state.step, metrics)
    if ctx.is_main:
        print(metrics.format_table(), flush=True)
        print(f"exported to {output_dir / 'export'} (best: step {trainer.state.best_step}, "
              f"mIoU {trainer.state.best_miou:.4f} in {output_dir / 'best'})", flush=True)
    trainer.engine.destroy()
    return metrics
