"""Training step: the toolkit's against a bare DeepSpeed loop and plain torch DDP, side by side.

    python scripts/benchmark_train.py --preset demo                              # 1 process
    python -m torch.distributed.run --standalone --nproc_per_node 2 scripts/benchmark_train.py --preset demo
    torchrun --nproc_per_node 8 scripts/benchmark_train.py --preset b5_768 --accelerator cuda

Three loops train the same network (same initial weights), batch geometry, loss and data
(generated LoveDA-format tiles, or --data-root), each in its own copy:

- ``toolkit``: :meth:`mapsage_ds.training.trainer.Trainer.train_step`, as built by a real run
  (the run's data stream, sampler, transforms, task, engine builder and schedule);
- ``bare``: ``engine(batch); engine.backward(loss); engine.step()`` on the same DeepSpeed config,
  fed by a plain ``DataLoader`` (``DistributedSampler``, persistent workers when there are workers);
- ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` with torch AdamW (bf16 presets under
  ``torch.autocast``), fed like ``bare``.

After a warm-up of each, the loops run in blocks of --block steps, interleaved in rotating order
for --rounds rounds; a block's time (device synchronised at its end) over its steps is one sample,
and the figures are medians. Rank 0 prints the table, writes it between the markers in --doc, and
ends with the line ``toolkit/bare = X``. Model FLOPs per step are counted once with
``torch.utils.flop_counter`` (forward and backward of one micro-batch); the achieved TFLOP/s and,
on a card whose dense bf16 peak is known, the MFU follow from them.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.flop_counter import FlopCounterMode

from mapsage_ds.builders import (
    build_dataset,
    build_ds_config,
    build_engine_builder,
    build_run_model,
    build_task_loss,
    build_train_stream,
    build_train_transform,
)
from mapsage_ds.config import Config, load_config
from mapsage_ds.data.classes import IGNORE_INDEX, LOVEDA_CLASSES
from mapsage_ds.data.loaders import TransformedDataset
from mapsage_ds.data.synthetic import SyntheticSpec, ensure_synthetic_tree
from mapsage_ds.errors import ConfigError
from mapsage_ds.files import replace_marked_section
from mapsage_ds.optim import LRSchedule
from mapsage_ds.runtime.accelerator import describe_machine, setup_distributed, synchronize, teardown_distributed
from mapsage_ds.runtime.engine import build_optimizer, compute_dtype, initialize_engine
from mapsage_ds.tasks import SegmentationTask
from mapsage_ds.training.run_log import RunLogger
from mapsage_ds.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
# Preset -> (recipe, overrides, generated tile side). The seed plan's batch: 8 per card at 768².
PRESETS: dict[str, tuple[str, list[str], int]] = {
    "demo": ("demo", ["train.micro_batch_size=8", "data.crop_size=128"], 128),
    "b5_768": ("segformer_b5_loveda", ["train.micro_batch_size=8", "data.crop_size=768",
                                       "train.grad_accum_steps=1", "model.pretrained=null"], 1024),
    "vitl_768": ("dinov3_sat_vitl_loveda", ["train.micro_batch_size=8", "data.crop_size=768",
                                            "train.grad_accum_steps=1", "model.pretrained=null",
                                            "unfreeze=null"], 1024),
}
# Dense bf16 peak of one card, for the MFU (vendor data sheets).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


@dataclass
class Loop:
    """One of the compared training loops: ``step()`` runs one optimizer step."""

    name: str
    step: Callable[[], None]


def endless(loader: DataLoader, sampler: DistributedSampler) -> Iterator[dict]:
    """Batches of ``loader`` epoch after epoch."""
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from loader


def preset_config(preset: str, data_root: Path, extra: list[str]) -> Config:
    """The run config the preset benchmarks."""
    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
    recipe, overrides, _ = PRESETS[preset]
    return load_config(recipe=recipe, overrides=[*overrides, f"data.root={str(data_root)!r}", "data.synthetic=null",
                                                 "data.validate=false", *extra])


def plain_loader(dataset: TransformedDataset, config: Config, *, rank: int, world_size: int, pin: bool
                 ) -> Iterator[dict]:
    """What a user's own loop would feed: a DataLoader over the same samples and transforms."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=0, drop_last=True)
    workers = config.data.num_workers
    loader = DataLoader(dataset, batch_size=config.train.micro_batch_size, sampler=sampler, drop_last=True,
                        num_workers=workers, persistent_workers=workers > 0, pin_memory=pin)
    return endless(loader, sampler)


def build_loops(config: Config, ctx, *, ds_config: dict) -> tuple[list[Loop], SegmentationTask, dict]:
    """The three loops over three copies of one network; also the task and one batch (for FLOPs)."""
    class_names = list(LOVEDA_CLASSES)
    built = build_run_model(config, class_names, ds_config=ds_config)
    train_data = TransformedDataset(build_dataset(config.data, config.data.train_split),
                                    build_train_transform(config.data, built.normalize), seed=config.train.seed)
    dtype = compute_dtype(ds_config)
    loss = build_task_loss(config.loss, num_classes=len(class_names))
    task = SegmentationTask(built.module, ignore_index=IGNORE_INDEX, loss=loss)
    bare_task, ddp_task = copy.deepcopy(task), copy.deepcopy(task)
    pin = ctx.device.type != "cpu"

    stream = build_train_stream(config.data, train_data, ctx, batch_size=config.train.micro_batch_size,
                                seed=config.train.seed, num_classes=len(class_names))
    engine = build_engine_builder(config, task.to(ctx.device, dtype), built, ds_config, verbose=False).build(0)
    trainer = Trainer(
        engine=engine, schedule=LRSchedule(base_lr=config.optim.lr, total_steps=10**9), stream=stream,
        evaluate=lambda: None, on_new_best=lambda *_: None, ctx=ctx, checkpoint_dir=Path(tempfile.gettempdir()),
        logger=RunLogger(".", enabled=False, total_steps=0), max_steps=10**9, grad_accum_steps=1, eval_every=10**9,
        save_every=10**9, log_every=10**9, keep_checkpoints=1, client_config={}, run_id="benchmark")

    bare_task.to(ctx.device, dtype)
    bare_engine = initialize_engine(bare_task, build_optimizer(
        [{"params": [p for p in bare_task.parameters() if p.requires_grad], "weight_decay": config.optim.weight_decay}],
        lr=config.optim.lr, betas=config.optim.betas, eps=config.optim.eps), ds_config)
    bare_batches = plain_loader(train_data, config, rank=ctx.rank, world_size=ctx.world_size, pin=pin)

    def bare_step() -> None:
        batch = {k: v.to(ctx.device, non_blocking=True) for k, v in next(bare_batches).items()
                 if isinstance(v, torch.Tensor)}
        outputs = bare_engine(batch)
        bare_engine.backward(outputs["loss"])
        bare_engine.step()

    ddp_task.to(ctx.device)  # fp32 weights; bf16 presets compute under autocast
    ddp = torch.nn.parallel.DistributedDataParallel(
        ddp_task, device_ids=[ctx.device_index] if ctx.device_index is not None else None)
    ddp_optimizer = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=config.optim.lr,
                                      betas=tuple(config.optim.betas), eps=config.optim.eps)
    ddp_batches = plain_loader(train_data, config, rank=ctx.rank, world_size=ctx.world_size, pin=pin)

    def ddp_step() -> None:
        batch = {k: v.to(ctx.device, non_blocking=True) for k, v in next(ddp_batches).items()
                 if isinstance(v, torch.Tensor)}
        with torch.autocast(ctx.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = ddp(batch)["loss"]
        loss.backward()
        if config.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), config.optim.grad_clip)
        ddp_optimizer.step()
        ddp_optimizer.zero_grad(set_to_none=True)

    sample = {k: v.to(ctx.device) for k, v in next(plain_loader(train_data, config, rank=0, world_size=1, pin=False))
              .items() if isinstance(v, torch.Tensor)}
    loops = [Loop("toolkit", trainer.train_step), Loop("bare", bare_step), Loop("ddp", ddp_step)]
    return loops, bare_task, sample


def step_flops(task: SegmentationTask, batch: dict, dtype: torch.dtype) -> int:
    """Model FLOPs of forward + backward on one micro-batch."""
    counter = FlopCounterMode(display=False)
    with counter:
        outputs = task({"image": batch["image"].to(dtype), "mask": batch["mask"]})
        outputs["loss"].backward()
    task.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure(loops: list[Loop], *, device: torch.device, warmup: int, rounds: int, block: int
            ) -> dict[str, list[float]]:
    """Seconds per step of each loop: one sample per block, blocks interleaved in rotating order."""
    for loop in loops:
        for _ in range(warmup):
            loop.step()
    synchronize(device)
    samples: dict[str, list[float]] = {loop.name: [] for loop in loops}
    for round_index in range(rounds):
        shift = round_index % len(loops)
        for loop in loops[shift:] + loops[:shift]:
            dist.barrier()
            started = time.perf_counter()
            for _ in range(block):
                loop.step()
            synchronize(device)
            dist.barrier()  # the slowest rank sets the pace, as in training
            samples[loop.name].append((time.perf_counter() - started) / block)
    return samples


def peak_memory(device: torch.device) -> str:
    """Rank 0's peak: the card allocator's high-water mark, or the process's peak resident memory on CPU."""
    if device.type != "cpu":
        return f"{torch.get_device_module(device).max_memory_allocated(device) / 2**30:.2f} GiB on the card"
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return f"{kib / 2**20:.2f} GiB resident (host)"


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of the card, when it is one we know."""
    return next((peak for name, peak in PEAK_BF16_TFLOPS.items() if name in device_name), None)


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison; returns the figures (rank 0 also writes --doc)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    parser.add_argument("--data-root", default=None, help="a LoveDA tree (default: generated tiles in a temp dir)")
    parser.add_argument("--warmup", type=int, default=5, help="steps of each loop before timing")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--block", type=int, default=10, help="steps per timed block")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    parser.add_argument("--accelerator", default=None)
    parser.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    parser.add_argument("--machine", default=None, help="machine description for the table (default: detected)")
    args = parser.parse_args(argv)

    ctx = setup_distributed(args.accelerator)
    try:
        root = Path(args.data_root) if args.data_root else Path(tempfile.gettempdir()) / f"mapsage_bench_{args.preset}"
        if args.data_root is None and ctx.is_main:
            side = PRESETS[args.preset][2]
            ensure_synthetic_tree(root, SyntheticSpec(size=side, train_per_scene=32 if side <= 256 else 8,
                                                      val_per_scene=1, test_per_scene=1, seed=0))
        dist.barrier()
        config = preset_config(args.preset, root, args.overrides)
        ds_config = build_ds_config(config.train, config.optim, world_size=ctx.world_size, accelerator=ctx.accelerator)
        torch.manual_seed(config.train.seed)
        loops, task, sample = build_loops(config, ctx, ds_config=ds_config)
        samples = measure(loops, device=ctx.device, warmup=args.warmup, rounds=args.rounds, block=args.block)
        dtype = compute_dtype(ds_config)
        flops = step_flops(task, sample, dtype) * ctx.world_size
        figures = report(args, ctx, config, samples, flops=flops, dtype=dtype)
        dist.barrier()
        return figures
    finally:
        teardown_distributed()


def report(args: argparse.Namespace, ctx, config: Config, samples: dict[str, list[float]], *, flops: int,
           dtype: torch.dtype) -> dict:
    """Medians, ratios, throughput; the table on rank 0."""
    median = {name: statistics.median(values) for name, values in samples.items()}
    images = config.train.micro_batch_size * config.train.grad_accum_steps * ctx.world_size
    machine = args.machine or describe_machine(ctx.device)
    card_peak = peak_tflops(machine)
    peak = peak_memory(ctx.device)
    figures = {"median_s": median, "toolkit/bare": median["toolkit"] / median["bare"], "peak_memory": peak,
               "ddp/bare": median["ddp"] / median["bare"], "images_per_s": images / median["toolkit"],
               "tflops": flops / median["toolkit"] / 1e12}
    if not ctx.is_main:
        return figures
    lines = [
        f"### Training step, preset `{args.preset}`, {ctx.world_size} process(es) — {machine}",
        "",
        f"`python scripts/benchmark_train.py --preset {args.preset}` ({config.model.arch} `{config.model.size}`, "
        f"{config.train.micro_batch_size} × {config.data.crop_size}² per process, `{config.train.deepspeed}`, "
        f"{str(dtype).removeprefix('torch.')}, {config.data.num_workers} loader workers; medians of {args.rounds} "
        f"interleaved blocks of {args.block} steps after {args.warmup} warm-up steps each).",
        "",
        "| loop | s/step | × bare | images/s |",
        "|---|---|---|---|",
    ]
    for name in ("toolkit", "bare", "ddp"):
        lines.append(f"| {name} | {median[name]:.4f} | {median[name] / median['bare']:.2f} | "
                     f"{images / median[name]:.1f} |")
    achieved = figures["tflops"]
    mfu = (f", MFU {achieved / (card_peak * ctx.world_size):.1%} of {card_peak:.0f} TFLOP/s per card"
           if card_peak else "")
    lines += ["", f"Model FLOPs per step {flops / 1e12:.3f} TFLOP (forward + backward, all ranks): "
                  f"{achieved:.3f} TFLOP/s achieved by the toolkit step{mfu}. Peak memory of rank 0, all three "
                  f"loops alive: {peak}.", ""]
    section = "\n".join(lines)
    print(section)
    replace_marked_section(args.doc, f"train-benchmark-{args.preset}-{ctx.world_size}", section)
    print(f"toolkit/bare = {figures['toolkit/bare']:.3f}")
    return figures


if __name__ == "__main__":
    main()
