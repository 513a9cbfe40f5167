"""Scene prediction memory: peak RSS and windows/s of `mapsage-predict` on generated scenes of growing size.

    python scripts/benchmark_scenes.py                           # 2048², 4096², 8192² on CPU, SegFormer mini
    python scripts/benchmark_scenes.py --sizes 2048,4096 --window-batch-size 2 --threads 2 --doc /tmp/bench.md

Each scene is a generated 3-band ``uint8`` GeoTIFF (EPSG:32650, 0.3 m pixels, tiled, written block by
block so the generator itself stays small) predicted by the real command, ``mapsage_ds.cli.predict.main``
with ``--model EXPORT --input SCENE --output-dir OUT``, the protocol's default tile and stride and
``--window-batch-size`` (default: the protocol's), in a fresh Python process per scene: its peak resident
set (``VmHWM`` of ``/proc/self/status``) is then that scene's alone, imports, model and GDAL caches
included. The model is a random SegFormer export (``--model-size``, default ``mini``, the demo's): speed
and memory do not depend on weight values. windows/s counts every window of the scene over the whole
command (model loading and the COG copy included). The section between the markers in --doc is
replaced (or appended) with the table, naming the machine; each window batch size has its own section.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
_MARK = "BENCHMARK_SCENE_RESULT "
_GENERATE_ROWS = 512


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def write_scene(path: Path, size: int, *, seed: int) -> Path:
    """A ``size``² RGB GeoTIFF of smooth random fields with noise, written ``_GENERATE_ROWS`` rows at a time."""
    import rasterio
    from rasterio.crs import CRS
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    rng = np.random.default_rng(seed)
    profile = {"driver": "GTiff", "height": size, "width": size, "count": 3, "dtype": "uint8", "tiled": True,
               "blockxsize": 512, "blockysize": 512, "compress": "deflate", "crs": CRS.from_epsg(32650),
               "transform": from_origin(400_000.0, 3_500_000.0, 0.3, 0.3)}
    with rasterio.open(path, "w", **profile) as dst:
        for top in range(0, size, _GENERATE_ROWS):
            rows = min(_GENERATE_ROWS, size - top)
            coarse = rng.integers(0, 256, (3, rows // 16 + 1, size // 16 + 1))
            block = np.kron(coarse, np.ones((1, 16, 16), dtype=np.int64))[:, :rows, :size]
            block = np.clip(block + rng.integers(-12, 13, block.shape), 0, 255).astype(np.uint8)
            dst.write(block, window=Window(0, top, size, rows))
    return path


def write_export(folder: Path, model_size: str, *, seed: int) -> Path:
    """A random SegFormer of ``model_size`` written as an export (what ``--model`` takes)."""
    import torch

    from mapsage_ds.data.classes import LOVEDA_CLASSES
    from mapsage_ds.models.export import write_hf_export
    from mapsage_ds.models.segformer import build_segformer

    torch.manual_seed(seed)
    model = build_segformer(model_size, list(LOVEDA_CLASSES))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return write_hf_export(model, state, folder, image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225))


def child(argv: list[str]) -> None:
    """Run the predict command in this (fresh) process and print its time and this process's peak RSS."""
    import torch

    from mapsage_ds.cli.predict import main as predict_main

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)  # a world of one, even inside a launcher's job
    threads = int(os.environ["BENCHMARK_THREADS"])
    torch.set_num_threads(threads)
    start = time.perf_counter()
    predict_main(argv)
    seconds = time.perf_counter() - start
    print(_MARK + json.dumps({"seconds": seconds, "peak_rss": _peak_rss_bytes(), "threads": threads}), flush=True)


def measure(scene: Path, export: Path, out: Path, *, threads: int, window_batch_size: int) -> dict:
    """One scene predicted in a fresh process: seconds, peak RSS."""
    env = {**os.environ, "BENCHMARK_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", str(export), "--input",
               str(scene), "--output-dir", str(out), "--overwrite", "--window-batch-size", str(window_batch_size)]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-4000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith(_MARK))
    return json.loads(line[len(_MARK):])


def main(argv: list[str] | None = None) -> list[dict]:
    """Measure every scene size and write the table into --doc; returns the records."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1:])
        return []
    import torch

    from mapsage_ds.evaluation.predictor import window_starts
    from mapsage_ds.evaluation.protocol import EvalProtocol
    from mapsage_ds.files import replace_marked_section
    from mapsage_ds.runtime.accelerator import describe_machine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2048,4096,8192", help="scene sides in pixels, comma-separated")
    parser.add_argument("--model-size", default="mini", help="SegFormer size of the random export")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="intra-op threads")
    parser.add_argument("--window-batch-size", type=int, default=None, help="windows per forward (default: the "
                                                                             "protocol's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default=None, help="where scenes and outputs go (default: a temporary folder)")
    parser.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    protocol = EvalProtocol()
    batch = args.window_batch_size or protocol.window_batch_size
    classes = 7
    records = []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        work = Path(work)
        export = write_export(work / "export", args.model_size, seed=args.seed)
        for size in sizes:
            scene = write_scene(work / f"scene_{size}.tif", size, seed=args.seed)
            windows = len(window_starts(size, protocol.tile, protocol.stride)) ** 2
            result = measure(scene, export, work / "out", threads=args.threads, window_batch_size=batch)
            strip = (classes + 1) * protocol.tile * size * 4  # blend scores and weights, float32
            record = {"size": size, "windows": windows, "windows_per_s": windows / result["seconds"],
                      "strip_bytes": strip, "logits_bytes": classes * size * size * 4, **result}
            records.append(record)
            print(f"{size}²: {windows} windows in {result['seconds']:.1f} s ({record['windows_per_s']:.2f}/s), "
                  f"peak RSS {result['peak_rss'] / 2**20:.0f} MiB", flush=True)
            scene.unlink()

    machine = describe_machine(torch.device("cpu"))
    lines = [
        f"## Scene prediction: peak memory against scene size ({batch} windows per batch)",
        "",
        f"Machine: {machine} (torch {torch.__version__}, {args.threads} intra-op thread(s); the machine is shared, "
        f"so times are noisy). Produced by `python scripts/benchmark_scenes.py --sizes {args.sizes} --model-size "
        f"{args.model_size} --window-batch-size {batch} --threads {args.threads}`.",
        "",
        f"Each scene is a generated 3-band `uint8` GeoTIFF (EPSG:32650, 0.3 m) predicted by `mapsage-predict "
        f"--model EXPORT --input SCENE` (a random SegFormer `{args.model_size}` export; tile {protocol.tile}, "
        f"stride {protocol.stride}, `--window-batch-size {batch}`, `--blend mean`), in a fresh "
        "process per scene: peak RSS is that process's `VmHWM` (Python, torch, DeepSpeed, GDAL and the model "
        "included). windows/s is over the whole command, model loading and the COG copy included. The blend strip "
        "is the one buffer that grows with the scene, with its width only: (7 scores + 1 weight) × tile × width "
        "float32; a whole-scene float32 logit array is shown for comparison.",
        "",
        "| scene (px) | windows | seconds | windows/s | peak RSS (MiB) | blend strip (MiB) "
        "| whole-scene logits (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(f"| {r['size']}² | {r['windows']} | {r['seconds']:.1f} | {r['windows_per_s']:.2f} | "
                     f"{r['peak_rss'] / 2**20:.0f} | {r['strip_bytes'] / 2**20:.0f} | "
                     f"{r['logits_bytes'] / 2**20:.0f} |")
    replace_marked_section(args.doc, f"scene-memory-benchmark-batch{batch}", "\n".join(lines) + "\n")
    return records


if __name__ == "__main__":
    main()
