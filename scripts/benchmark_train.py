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

``--variants channels_last,eager_attention,compile`` adds one more toolkit loop per variant, each
changing one thing against ``toolkit`` (which trains as a run does: transformers' fused SDPA
attention, contiguous tensors, no compilation), reported as a ratio to it so that each is kept
only where it pays:

- ``channels_last``: input images, and so the convolutions' activations, in channels-last memory
  format (the weights cannot be: DeepSpeed's initial broadcast refuses channels-last parameters);
- ``eager_attention``: transformers' unfused (eager) attention instead of SDPA;
- ``compile``: ``torch.compile`` of the module through ``DeepSpeedEngine.compile`` with the
  accelerator's backend (inductor; GCU: Enflame's). Its compilation happens in the warm-up.

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
from deepspeed.accelerator import get_accelerator
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.flop_counter import FlopCounterMode
from transformers import PreTrainedModel

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
# Variants of the toolkit step, each measured against it (--variants).
VARIANTS = {
    "channels_last": "input images, and so the activations, in channels-last memory format",
    "eager_attention": "transformers' eager attention instead of fused SDPA",
    "compile": "torch.compile of the module (DeepSpeedEngine.compile, the accelerator's backend)",
}
# A variant "pays" when it beats the toolkit step by more than this (the medians' noise on a busy machine).
PAYS_MARGIN = 0.03
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


def apply_variant(task: SegmentationTask, variant: str | None) -> None:
    """Change ``task`` (before its engine is built) as ``variant`` says."""
    if variant == "channels_last":
        # The weights stay contiguous: DeepSpeed's initial broadcast views every parameter as bytes,
        # which a channels-last tensor refuses. Convolutions follow the input's format.
        def images_channels_last(module, args):
            (batch,) = args
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)

        task.register_forward_pre_hook(images_channels_last)
    elif variant == "eager_attention":
        models = [m for m in task.modules() if isinstance(m, PreTrainedModel)]
        for model in models:
            model.set_attn_implementation("eager")
        if not models:
            raise ConfigError("--variants eager_attention: the model has no transformers attention to switch")


def toolkit_loop(name: str, task: SegmentationTask, config: Config, ctx, built, ds_config: dict,
                 train_data: TransformedDataset, *, compile_module: bool = False) -> Loop:
    """``Trainer.train_step`` as a run builds it: the run's stream, engine builder and trainer."""
    stream = build_train_stream(config.data, train_data, ctx, batch_size=config.train.micro_batch_size,
                                seed=config.train.seed, num_classes=len(LOVEDA_CLASSES))
    engine = build_engine_builder(config, task.to(ctx.device, compute_dtype(ds_config)), built, ds_config,
                                  verbose=False).build(0)
    if compile_module:
        engine.compile(backend=get_accelerator().get_compile_backend())
    trainer = Trainer(
        engine=engine, schedule=LRSchedule(base_lr=config.optim.lr, total_steps=10**9), stream=stream,
        evaluate=lambda: None, on_new_best=lambda *_: None, ctx=ctx, checkpoint_dir=Path(tempfile.gettempdir()),
        logger=RunLogger(".", enabled=False, total_steps=0), max_steps=10**9, grad_accum_steps=1, eval_every=10**9,
        save_every=10**9, log_every=10**9, keep_checkpoints=1, client_config={}, run_id="benchmark")
    return Loop(name, trainer.train_step)


def build_loops(config: Config, ctx, *, ds_config: dict, variants: list[str] = ()
                ) -> tuple[list[Loop], SegmentationTask, dict]:
    """The loops over copies of one network (toolkit, bare, ddp, the variants); also the task and one batch."""
    class_names = list(LOVEDA_CLASSES)
    built = build_run_model(config, class_names, ds_config=ds_config)
    train_data = TransformedDataset(build_dataset(config.data, config.data.train_split),
                                    build_train_transform(config.data, built.normalize), seed=config.train.seed)
    dtype = compute_dtype(ds_config)
    loss = build_task_loss(config.loss, num_classes=len(class_names))
    task = SegmentationTask(built.module, ignore_index=IGNORE_INDEX, loss=loss)
    bare_task, ddp_task = copy.deepcopy(task), copy.deepcopy(task)
    variant_tasks = {variant: copy.deepcopy(task) for variant in variants}
    pin = ctx.device.type != "cpu"

    loops = [toolkit_loop("toolkit", task, config, ctx, built, ds_config, train_data)]

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

    loops += [Loop("bare", bare_step), Loop("ddp", ddp_step)]
    for variant, variant_task in variant_tasks.items():
        apply_variant(variant_task, variant)
        loops.append(toolkit_loop(f"toolkit+{variant}", variant_task, config, ctx, built, ds_config, train_data,
                                  compile_module=variant == "compile"))
    sample = {k: v.to(ctx.device) for k, v in next(plain_loader(train_data, config, rank=0, world_size=1, pin=False))
              .items() if isinstance(v, torch.Tensor)}
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
    parser.add_argument("--variants", default="", help=f"comma list of toolkit variants measured against it: "
                                                         f"{', '.join(VARIANTS)}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    parser.add_argument("--accelerator", default=None)
    parser.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    parser.add_argument("--machine", default=None, help="machine description for the table (default: detected)")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"--variants {args.variants}: unknown {', '.join(unknown)}; expected any of "
                          f"{', '.join(VARIANTS)}")

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
        loops, task, sample = build_loops(config, ctx, ds_config=ds_config, variants=variants)
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
    variants = {name.removeprefix("toolkit+"): median[name] / median["toolkit"]
                for name in median if name.startswith("toolkit+")}
    figures = {"median_s": median, "toolkit/bare": median["toolkit"] / median["bare"], "peak_memory": peak,
               "ddp/bare": median["ddp"] / median["bare"], "images_per_s": images / median["toolkit"],
               "tflops": flops / median["toolkit"] / 1e12, "variants": variants}
    if not ctx.is_main:
        return figures
    lines = [
        f"### Training step, preset `{args.preset}`, {ctx.world_size} process(es)"
        f"{', variants of the toolkit step' if variants else ''} — {machine}",
        "",
        f"`python scripts/benchmark_train.py --preset {args.preset}"
        f"{' --variants ' + ','.join(variants) if variants else ''}` ({config.model.arch} `{config.model.size}`, "
        f"{config.train.micro_batch_size} × {config.data.crop_size}² per process, `{config.train.deepspeed}`, "
        f"{str(dtype).removeprefix('torch.')}, {config.data.num_workers} loader workers; medians of {args.rounds} "
        f"interleaved blocks of {args.block} steps after {args.warmup} warm-up steps each).",
        "",
        "| loop | s/step | × bare | images/s |",
        "|---|---|---|---|",
    ]
    for name in median:
        lines.append(f"| {name} | {median[name]:.4f} | {median[name] / median['bare']:.2f} | "
                     f"{images / median[name]:.1f} |")
    achieved = figures["tflops"]
    mfu = (f", MFU {achieved / (card_peak * ctx.world_size):.1%} of {card_peak:.0f} TFLOP/s per card"
           if card_peak else "")
    lines += ["", f"Model FLOPs per step {flops / 1e12:.3f} TFLOP (forward + backward, all ranks): "
                  f"{achieved:.3f} TFLOP/s achieved by the toolkit step{mfu}. Peak memory of rank 0, all "
                  f"{len(median)} loops alive: {peak}.", ""]
    if variants:
        lines += ["| variant of the toolkit step | × toolkit | verdict |", "|---|---|---|"]
        for variant, ratio in variants.items():
            verdict = "pays" if ratio < 1 - PAYS_MARGIN else "slower" if ratio > 1 + PAYS_MARGIN else "no effect"
            lines.append(f"| {variant}: {VARIANTS[variant]} | {ratio:.2f} | {verdict} |")
        lines += ["", f"A variant pays when it is more than {PAYS_MARGIN:.0%} faster than the toolkit step as it "
                      "trains today; only then is it worth turning on for this model and machine.", ""]
    section = "\n".join(lines)
    print(section)
    marker = f"train-benchmark-{args.preset}-{ctx.world_size}" + ("-variants" if variants else "")
    replace_marked_section(args.doc, marker, section)
    print(f"toolkit/bare = {figures['toolkit/bare']:.3f}")
    return figures


if __name__ == "__main__":
    main()
