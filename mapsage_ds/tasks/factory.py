"""The task a run trains, picked by name (``task:`` in the recipe); the composition's only task switch.

A new training method (another distillation flavour, say) is a new small task class plus a
branch here, not a new script: the trainer, checkpoints, resume, evaluation and export stay the
same because they see the task only through ``forward(batch) -> {"loss", ...}``, ``predict``
and ``task.model``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mapsage_ds.config import DistillConfig, TeacherConfig
from mapsage_ds.data.loaders import TrainStream
from mapsage_ds.data.transforms import Normalize
from mapsage_ds.errors import ConfigError
from mapsage_ds.losses import CompositeLoss
from mapsage_ds.losses.distill import DistillationLoss
from mapsage_ds.runtime.accelerator import DistributedContext
from mapsage_ds.tasks.distill import DistillationTask, FeatureProjection
from mapsage_ds.tasks.segmentation import SegmentationTask
from mapsage_ds.tasks.teacher import FrozenTeacher, feature_channels, resolve_precision
from mapsage_ds.tasks.teacher_cache import TeacherCache, fill_teacher_cache, is_complete

TASKS = ("segment", "distill")


def build_task(
    name: str,
    model: nn.Module,
    *,
    teacher: TeacherConfig,
    distill: DistillConfig,
    seed: int,
    cache_dir: Path,
    cache_key: dict,
    num_batches: int,
    normalize: Normalize,
    loss: CompositeLoss,
    boundary_head: nn.Module | None,
    ignore_index: int,
    stream: TrainStream,
    ctx: DistributedContext,
    dtype: torch.dtype,
) -> SegmentationTask:
    """The task ``name`` (``segment`` | ``distill``), around the student ``model`` and its supervised ``loss``.

    For ``distill`` this loads the frozen teacher (in ``teacher.precision``, on this rank's
    device) and, with ``teacher.offload_features``, fills or reuses the teacher cache in
    ``cache_dir`` by replaying ``num_batches`` micro-batches of ``stream``, then releases the
    teacher before the engine is built. ``cache_key`` holds what the batches depend on (data
    settings, batch geometry, seed) besides the teacher itself.

    Raises:
        ConfigError: On an unknown task name.
    """
    if name == "segment":
        return SegmentationTask(model, ignore_index=ignore_index, loss=loss, boundary_head=boundary_head)
    if name != "distill":
        raise ConfigError(f"task={name!r}: expected one of {', '.join(TASKS)}")
    section, weights = teacher, distill
    if section.path is None:
        raise ConfigError("task=distill needs teacher.path (a MapSage export directory)")
    distill_loss = DistillationLoss(kl=weights.kl, temperature=weights.temperature, feature=weights.feature,
                                    feature_loss=weights.feature_loss, ignore_index=ignore_index)
    teacher_dtype = resolve_precision(section.precision, default=dtype)
    frozen = FrozenTeacher.load(section.path, input_normalize=normalize, device=ctx.device, dtype=teacher_dtype,
                                 feature_level=section.feature_level, logits=distill_loss.needs_logits,
                                 features=distill_loss.needs_features)
    projection = None
    if distill_loss.needs_features:
        student_channels = feature_channels(model)
        level = weights.student_feature_level
        if not -len(student_channels) <= level < len(student_channels):
            raise ConfigError(f"distill.student_feature_level={level}: the student has "
                              f"{len(student_channels)} feature maps")
        # Seeded on its own so the student's random stream does not depend on the task kind.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            projection = FeatureProjection(student_channels[level], frozen.feature_dim)
    source = frozen
    if section.offload_features:
        source = _teacher_cache(frozen, cache_dir=cache_dir, cache_key=cache_key, num_batches=num_batches,
                                normalize=normalize, stream=stream, ctx=ctx)
    return DistillationTask(model, teacher=source, distill_loss=distill_loss, supervised_weight=weights.supervised,
                            projection=projection, student_feature_level=weights.student_feature_level,
                            ignore_index=ignore_index, loss=loss, boundary_head=boundary_head,
                            frozen_teacher=frozen)


def _teacher_cache(teacher: FrozenTeacher, *, cache_dir: Path, cache_key: dict, num_batches: int,
                   normalize: Normalize, stream: TrainStream, ctx: DistributedContext) -> TeacherCache:
    """Fill (or reuse) this rank's cache of the teacher's outputs, then release the teacher."""
    # Everything the cached outputs depend on: the teacher, its precision and outputs, and the
    # exact batches (data, augmentation, sampler, batch geometry, seed, rank layout).
    fingerprint = {
        "teacher_digest": teacher.digest_at_load, "dtype": str(teacher.dtype),
        "feature_level": teacher.feature_level, "logits": teacher.logits, "features": teacher.features,
        **cache_key, "world_size": ctx.world_size, "rank": ctx.rank, "batches": num_batches,
        "input_normalize": [normalize.mean, normalize.std],
    }
    if is_complete(cache_dir, rank=ctx.rank, fingerprint=fingerprint):
        print(f"[rank {ctx.rank}] reusing the teacher cache in {cache_dir}", flush=True)
    else:
        print(f"[rank {ctx.rank}] caching teacher outputs for {num_batches} micro-batches in {cache_dir}", flush=True)
        fill_teacher_cache(teacher, stream, cache_dir=cache_dir, rank=ctx.rank, num_batches=num_batches,
                           fingerprint=fingerprint)
    teacher.release()
    dist.barrier()
    return TeacherCache(cache_dir, rank=ctx.rank, device=ctx.device)


def finish_task(task: SegmentationTask, *, output_dir: str | Path, is_main: bool) -> None:
    """End-of-training checks of a task (distillation: the teacher is bitwise unchanged)."""
    if isinstance(task, DistillationTask):
        task.finish(output_dir, is_main=is_main)
