"""Measure what freezing part of the backbone saves: step time, optimizer state and peak memory.

    python scripts/benchmark_unfreeze.py --size small --fractions 0,0.5,0.75 --steps 12 --write-docs

Each frozen fraction runs in its own process (so peak RSS is its own), one after another on the
same machine, through the real path: DINOv3 + fusion head in a one-process DeepSpeed engine
(ZeRO-2), frozen parameters excluded before ``deepspeed.initialize``. Figures are reported as
ratios against the 0%-frozen run of the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A ViT-S-sized preset: big enough for freezing to matter, small enough for a 2-core CPU.
SMALL = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6)
MARKER = "<!-- benchmark_unfreeze -->"


def measure(fraction: float, *, steps: int, crop: int, batch: int, size: str) -> dict:
    """One run at ``fraction`` frozen in this process; returns its figures."""
    import torch

    from mapsage_ds.models import dinov3
    from mapsage_ds.models.factory import build_model
    from mapsage_ds.optim import build_param_groups
    from mapsage_ds.optim.unfreeze import set_frozen
    from mapsage_ds.runtime.accelerator import setup_distributed
    from mapsage_ds.runtime.engine import build_optimizer, fill_ds_config, initialize_engine, read_ds_config
    from mapsage_ds.tasks import SegmentationTask

    if size == "small":
        dinov3.DINOV3_PRESETS["small"] = SMALL
    ctx = setup_distributed("cpu")
    torch.manual_seed(0)
    built = build_model(arch="dinov3", size=size, class_names=[str(i) for i in range(7)], drop_path_rate=0.0)
    task = SegmentationTask(built.module)
    set_frozen(task.named_parameters(), layer_id=built.layer_id, num_layers=built.num_layers, fraction=fraction)
    ds_config = fill_ds_config(read_ds_config("zero2_fp32"), micro_batch_size=batch, grad_accum_steps=1,
                               world_size=ctx.world_size, grad_clip=1.0)
    groups = build_param_groups(task.named_parameters(), weight_decay=0.05)
    engine = initialize_engine(task, build_optimizer(groups, lr=1e-4, betas=(0.9, 0.999), eps=1e-8), ds_config)
    batch_data = {"image": torch.randn(batch, 3, crop, crop), "mask": torch.randint(0, 7, (batch, crop, crop))}
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        loss = engine(batch_data)["loss"]
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - started)
    optimizer_bytes = sum(t.numel() * t.element_size() for state in engine.optimizer.optimizer.state.values()
                          for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    total = sum(p.numel() for p in task.parameters())
    trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
    return {"fraction": fraction, "step_s": statistics.median(times[2:]), "params": total, "trainable": trainable,
            "optimizer_state_mb": optimizer_bytes / 2**20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _child(args: argparse.Namespace, fraction: float) -> dict:
    command = [sys.executable, __file__, "--child", str(fraction), "--steps", str(args.steps), "--crop",
               str(args.crop), "--batch", str(args.batch), "--size", args.size]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    output = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def format_table(rows: list[dict], args: argparse.Namespace) -> str:
    """Markdown table with ratios against the first (0% frozen) row."""
    base = rows[0]
    lines = [
        f"DINOv3 `{args.size}` + fusion head, {args.batch} × {args.crop}², ZeRO-2 fp32, 1 process, median of "
        f"{args.steps - 2} steps. Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        "no GPU.",
        "",
        "| frozen | trainable params | step time | × baseline | optimizer state | × baseline | peak RSS | × baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['fraction']:.0%} | {row['trainable'] / 1e6:.1f} M / {row['params'] / 1e6:.1f} M "
            f"| {row['step_s'] * 1000:.0f} ms | {row['step_s'] / base['step_s']:.2f} "
            f"| {row['optimizer_state_mb']:.0f} MB | {row['optimizer_state_mb'] / base['optimizer_state_mb']:.2f} "
            f"| {row['peak_rss_mb']:.0f} MB | {row['peak_rss_mb'] / base['peak_rss_mb']:.2f} |"
        )
    return "\n".join(lines)


def write_docs(table: str) -> None:
    """Replace the section between markers in docs/benchmarks.md (append it the first time)."""
    path = REPO / "docs" / "benchmarks.md"
    text = path.read_text()
    section = f"{MARKER}\n## Progressive unfreezing (scripts/benchmark_unfreeze.py)\n\n{table}\n{MARKER}"
    if MARKER in text:
        head, _, rest = text.partition(MARKER)
        _, _, tail = rest.partition(MARKER)
        text = head + section + tail
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", default="0,0.5,0.75")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", default="small")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.child, steps=args.steps, crop=args.crop, batch=args.batch, size=args.size)))
        return []
    rows = [_child(args, float(f)) for f in args.fractions.split(",")]
    table = format_table(rows, args)
    print(table)
    if args.write_docs:
        write_docs(table)
    return rows


if __name__ == "__main__":
    main()
