"""Batched sliding-window inference against the one-window-at-a-time loop, at identical outputs.

    python scripts/benchmark_inference.py                       # SegFormer mini, 1024² image, 2 settings
    python scripts/benchmark_inference.py --settings 1024/512,512/256 --model-size b2 --accelerator cuda

For each tile/stride setting both implementations run on the same image in the same process,
interleaved, after a warm-up; the outputs must agree within 1e-5 (else the run stops), and the
figures are the ratios of their best and of their median times. The section between the markers in --doc is
replaced (or appended) with the table, naming the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from mapsage_ds.data.classes import LOVEDA_CLASSES
from mapsage_ds.errors import ConfigError, MapSageError
from mapsage_ds.evaluation.predictor import Predictor, window_starts
from mapsage_ds.evaluation.protocol import EvalProtocol
from mapsage_ds.files import replace_marked_section
from mapsage_ds.models.segformer import build_segformer
from mapsage_ds.runtime.accelerator import describe_machine, detect_accelerator, synchronize
from mapsage_ds.tasks import SegmentationTask

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5


@torch.no_grad()
def one_window_at_a_time(forward, image: torch.Tensor, tile: int, stride: int) -> torch.Tensor:
    """The straightforward loop: each window alone, logits summed, divided by the per-pixel count."""
    _, _, height, width = image.shape
    tile_h, tile_w = min(tile, height), min(tile, width)
    total, count = None, torch.zeros(1, 1, height, width, device=image.device)
    for top in window_starts(height, tile, stride):
        for left in window_starts(width, tile, stride):
            # A contiguous copy, as the batched path's stack makes: convolutions on a strided view
            # of the full image were measured ~1.6x slower here, which would flatter batching.
            logits = forward(image[:, :, top:top + tile_h, left:left + tile_w].contiguous()).float()
            if total is None:
                total = torch.zeros(1, logits.shape[1], height, width, device=image.device)
            total[..., top:top + tile_h, left:left + tile_w] += logits
            count[..., top:top + tile_h, left:left + tile_w] += 1
    return total / count


def _timed(function, device: torch.device) -> tuple[float, torch.Tensor]:
    synchronize(device)
    started = time.perf_counter()
    out = function()
    synchronize(device)
    return time.perf_counter() - started, out


def parse_settings(text: str) -> list[tuple[int, int]]:
    """``"512/256,256/128"`` -> ``[(512, 256), (256, 128)]``."""
    settings = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        tile, sep, stride = part.partition("/")
        if not sep or not tile.isdigit() or not stride.isdigit():
            raise ConfigError(f"--settings {part!r}: expected TILE/STRIDE")
        settings.append((int(tile), int(stride)))
    if not settings:
        raise ConfigError("--settings: expected at least one TILE/STRIDE")
    return settings


def measure(task: SegmentationTask, image: torch.Tensor, *, tile: int, stride: int, window_batch_size: int,
            repeats: int, device: torch.device) -> dict:
    """Time both implementations on ``image``, interleaved after a warm-up; check their outputs agree."""
    protocol = EvalProtocol(mode="slide", tile=tile, stride=stride, window_batch_size=window_batch_size)
    batched = Predictor(task.predict, normalize=None, protocol=protocol)
    run_batched = partial(batched.logits, image)
    run_loop = partial(one_window_at_a_time, task.predict, image, tile, stride)
    _, reference = _timed(run_loop, device)  # warm-up of both
    _, output = _timed(run_batched, device)
    difference = (output - reference).abs().max().item()
    if not difference <= TOLERANCE:
        raise MapSageError(f"tile {tile}/stride {stride}: batched and loop outputs differ by {difference}")
    loop_times, batched_times = [], []
    for _ in range(repeats):
        loop_times.append(_timed(run_loop, device)[0])
        batched_times.append(_timed(run_batched, device)[0])
    loop, fast = min(loop_times), min(batched_times)
    return {"tile": tile, "stride": stride, "windows": len(window_starts(image.shape[-2], tile, stride))
            * len(window_starts(image.shape[-1], tile, stride)), "loop_s": loop, "batched_s": fast,
            "speedup": loop / fast, "speedup_median": statistics.median(loop_times) / statistics.median(batched_times),
            "max_abs_diff": difference}


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark, print the table, write it into ``--doc``; returns one record per measurement."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-size", default="mini", help="SegFormer size (random weights: speed only)")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--settings", default="512/256,256/128", help="TILE/STRIDE,...")
    parser.add_argument("--window-batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", default=f"1,{torch.get_num_threads()}",
                        help="intra-op thread counts to measure with (comma list)")
    parser.add_argument("--accelerator", default=None)
    parser.add_argument("--machine", default=None, help="machine description (default: detected)")
    parser.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"), help="markdown file to update")
    args = parser.parse_args(argv)
    settings = parse_settings(args.settings)
    threads = sorted({int(t) for t in args.threads.split(",") if t.strip()})
    device = torch.device(detect_accelerator(args.accelerator))
    machine = args.machine or describe_machine(device)

    torch.manual_seed(0)
    task = SegmentationTask(build_segformer(args.model_size, list(LOVEDA_CLASSES))).to(device).eval()
    image = torch.randn(1, 3, args.image_size, args.image_size, device=device)
    records = []
    load_before, threads_before = _load(), torch.get_num_threads()
    try:
        for count in threads:
            torch.set_num_threads(count)
            for tile, stride in settings:
                record = {"threads": count, **measure(task, image, tile=tile, stride=stride, repeats=args.repeats,
                                                      window_batch_size=args.window_batch_size, device=device)}
                records.append(record)
                print(f"{count} thread(s), tile {tile} stride {stride}: {record['windows']} windows, best loop "
                      f"{record['loop_s']:.3f} s, best batched {record['batched_s']:.3f} s, "
                      f"x{record['speedup']:.2f} (medians x{record['speedup_median']:.2f}), "
                      f"max |diff| {record['max_abs_diff']:.1e}", flush=True)
    finally:
        torch.set_num_threads(threads_before)

    lines = [
        "## Sliding-window inference: batched windows vs one window at a time",
        "",
        f"Machine: {machine} (device `{device.type}`, torch {torch.__version__}). Produced by "
        f"`python scripts/benchmark_inference.py --model-size {args.model_size} --image-size {args.image_size} "
        f"--settings {args.settings} --window-batch-size {args.window_batch_size} --repeats {args.repeats} "
        f"--threads {args.threads}`.",
        "",
        f"Random SegFormer `{args.model_size}`, one {args.image_size}² image. Both implementations ran in the "
        f"same process, interleaved, after a warm-up; times are the best of {args.repeats}. Both feed the model "
        f"contiguous window copies. Outputs agree within {TOLERANCE:g} (column max |diff|). Speed-up = loop time "
        f"/ batched time, from the best times and from the medians. 1-minute load average {load_before:.1f} "
        f"before and {_load():.1f} after the run: other jobs share the machine, so absolute times are noisy and "
        "only the side-by-side ratios are meant to be read.",
        "",
        "| intra-op threads | tile / stride | windows | one at a time (s) | batched (s) | speed-up (best) "
        "| speed-up (median) | max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(f"| {r['threads']} | {r['tile']} / {r['stride']} | {r['windows']} | {r['loop_s']:.3f} | "
                     f"{r['batched_s']:.3f} | ×{r['speedup']:.2f} | ×{r['speedup_median']:.2f} | "
                     f"{r['max_abs_diff']:.1e} |")
    replace_marked_section(args.doc, "inference-benchmark", "\n".join(lines) + "\n")
    return records


if __name__ == "__main__":
    main()
