"""Cost of one distillation training step against one plain fine-tuning step, measured side by side.

    python scripts/benchmark_distill.py                     # SegFormer-B5 student, DINOv3 ViT-L/16 teacher, 128 px
    python scripts/benchmark_distill.py --student test --teacher test --crop 64 --steps 3   # quick check

Three variants train the same student on the same batches, interleaved step by step so that
machine load drifts hit them alike: ``finetune`` (SegmentationTask), ``distill_live`` (the frozen
teacher runs every step) and ``distill_cache`` (teacher outputs read from a teacher cache filled
beforehand; the fill time is reported on its own). Steps are forward + backward + AdamW in plain
torch, one process: DeepSpeed adds the same overhead to every variant. Weights are random
(timing does not depend on them). The figures are only comparable within one run, on one machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mapsage_ds.data.classes import IGNORE_INDEX, LOVEDA_CLASSES
from mapsage_ds.data.loaders import TrainSampler, TrainStream, TransformedDataset
from mapsage_ds.data.loveda import LoveDA
from mapsage_ds.data.synthetic import SyntheticSpec, ensure_synthetic_tree
from mapsage_ds.data.transforms import TrainTransform
from mapsage_ds.losses import build_loss
from mapsage_ds.losses.distill import DistillationLoss
from mapsage_ds.models import build_model
from mapsage_ds.tasks import DistillationTask, SegmentationTask
from mapsage_ds.tasks.distill import FeatureProjection
from mapsage_ds.tasks.teacher import FrozenTeacher, feature_channels, resolve_precision
from mapsage_ds.tasks.teacher_cache import TeacherCache, fill_teacher_cache


def _step(task: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    started = time.perf_counter()
    outputs = task(batch)
    optimizer.zero_grad(set_to_none=True)
    outputs["loss"].backward()
    optimizer.step()
    return time.perf_counter() - started


def run_benchmark(*, student: str, teacher: str, crop: int, batch: int, steps: int, warmup: int,
                  precision: str, feature: float, workdir: Path) -> dict:
    """Median (and best) seconds per step of each variant and their ratios to plain fine-tuning."""
    classes = list(LOVEDA_CLASSES)
    torch.manual_seed(0)
    student_built = build_model(arch="segformer", size=student, class_names=classes, drop_path_rate=0.0)
    teacher_built = build_model(arch="dinov3", size=teacher, class_names=classes, drop_path_rate=0.0)
    frozen = FrozenTeacher(teacher_built.module, normalize=teacher_built.normalize,
                           input_normalize=student_built.normalize, device=torch.device("cpu"),
                           dtype=resolve_precision(precision, default=torch.float32), logits=True,
                           features=feature > 0, source=f"dinov3 {teacher}")
    total = warmup + steps
    tree = ensure_synthetic_tree(workdir / "tree", SyntheticSpec(size=crop * 2, train_per_scene=max(total * batch, 2),
                                                                 val_per_scene=1, test_per_scene=1, seed=0))
    data = TransformedDataset(LoveDA(tree, "Train"), TrainTransform(crop_size=crop, normalize=student_built.normalize),
                              seed=0)
    stream = TrainStream(data, TrainSampler(len(data), rank=0, world_size=1, batch_size=batch, seed=0), num_workers=0)
    batches = [next(stream) for _ in range(total)]
    stream.load_state_dict({"epoch": 0, "batch_in_epoch": 0})
    started = time.perf_counter()
    fill_teacher_cache(frozen, stream, cache_dir=workdir / "cache", rank=0, num_batches=total, fingerprint={})
    fill_seconds = (time.perf_counter() - started) / total
    cache = TeacherCache(workdir / "cache", rank=0, device=torch.device("cpu"))

    supervised = build_loss(ignore_index=IGNORE_INDEX)
    distill = DistillationLoss(kl=1.0, temperature=2.0, feature=feature, ignore_index=IGNORE_INDEX)
    projection = None
    if feature > 0:
        projection = FeatureProjection(feature_channels(student_built.module)[2], frozen.feature_dim)
    tasks = {
        "finetune": SegmentationTask(copy.deepcopy(student_built.module), loss=supervised),
        "distill_live": DistillationTask(copy.deepcopy(student_built.module), teacher=frozen, distill_loss=distill,
                                         projection=copy.deepcopy(projection), loss=supervised),
        "distill_cache": DistillationTask(copy.deepcopy(student_built.module), teacher=cache, distill_loss=distill,
                                          projection=copy.deepcopy(projection), loss=supervised),
    }
    optimizers = {name: torch.optim.AdamW(task.parameters(), lr=1e-4) for name, task in tasks.items()}
    times: dict[str, list[float]] = {name: [] for name in tasks}
    for index, item in enumerate(batches):
        for name, task in tasks.items():  # interleaved: load changes hit every variant alike
            task.train()
            seconds = _step(task, optimizers[name], item)
            if index >= warmup:
                times[name].append(seconds)
    median = {name: statistics.median(values) for name, values in times.items()}
    best = {name: min(values) for name, values in times.items()}  # least disturbed by other load
    return {
        "student": f"segformer {student}", "teacher": f"dinov3 {teacher} ({frozen.dtype})", "crop": crop,
        "batch": batch, "steps": steps, "threads": torch.get_num_threads(),
        "seconds_per_step": median, "ratio_to_finetune": {k: v / median["finetune"] for k, v in median.items()},
        "best_seconds_per_step": best, "best_ratio_to_finetune": {k: v / best["finetune"] for k, v in best.items()},
        "cache_fill_seconds_per_batch": fill_seconds,
        "student_parameters_m": sum(p.numel() for p in student_built.module.parameters()) / 1e6,
        "teacher_parameters_m": sum(p.numel() for p in teacher_built.module.parameters()) / 1e6,
    }


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, run the benchmark, print (and optionally write) the result as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="b5", help="SegFormer size (test, mini, b0 .. b5)")
    parser.add_argument("--teacher", default="vitl16", help="DINOv3 preset (test, vitl16, vit7b16)")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--precision", default="fp32", help="teacher precision: fp32 | bf16 | fp16")
    parser.add_argument("--feature", type=float, default=0.5, help="feature-distillation weight (0: logits only)")
    # One thread by default: on a shared, oversubscribed machine OpenMP's spin-waiting distorts timings.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--output", default=None, help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="benchmark_distill_") as workdir:
        result = run_benchmark(student=args.student, teacher=args.teacher, crop=args.crop, batch=args.batch,
                               steps=args.steps, warmup=args.warmup, precision=args.precision, feature=args.feature,
                               workdir=Path(workdir))
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
