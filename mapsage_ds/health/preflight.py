"""Pre-flight: devices and precisions, collectives with bus bandwidth, data files, pretrained checkpoint keys.

``probe_*`` functions run on every rank and return plain dicts (gathered to rank 0 with
``all_gather_object``); ``check_*`` functions judge the gathered observations.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mapsage_ds.data.loveda import IMAGE_DIR, MASK_DIR, SCENES, read_mask_file, read_rgb_file
from mapsage_ds.errors import DataError
from mapsage_ds.health.result import CheckResult, failed, passed, warned
from mapsage_ds.models.weights import KeyReport
from mapsage_ds.runtime.accelerator import BACKENDS, DistributedContext, synchronize

# Relative Frobenius error of a matmul against a float64 reference, per precision.
MATMUL_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 5e-3}
_LISTED = 5


# ----------------------------------------------------------------------------------------------
# Devices


def probe_device(ctx: DistributedContext, *, dtypes: Sequence[torch.dtype], size: int) -> dict[str, Any]:
    """Where this rank runs, and a ``size``² matmul in each dtype on its device checked against float64."""
    generator = torch.Generator().manual_seed(1234 + ctx.rank)
    a = torch.randn(size, size, generator=generator, dtype=torch.float64)
    b = torch.randn(size, size, generator=generator, dtype=torch.float64)
    reference = a @ b
    matmuls = {}
    for dtype in dtypes:
        try:
            x, y = a.to(ctx.device, dtype), b.to(ctx.device, dtype)
            out = x @ y  # warm-up (kernel selection)
            synchronize(ctx.device)
            started = time.perf_counter()
            out = x @ y
            synchronize(ctx.device)
            seconds = time.perf_counter() - started
            error = ((out.double().cpu() - reference).norm() / reference.norm()).item()
            matmuls[_dtype_name(dtype)] = {"relative_error": error, "gflops": 2 * size**3 / seconds / 1e9,
                                           "ok": error <= MATMUL_TOLERANCE[dtype]}
        except RuntimeError as err:  # an unsupported dtype on this device
            matmuls[_dtype_name(dtype)] = {"error": str(err).splitlines()[0], "ok": False}
    return {"rank": ctx.rank, "local_rank": ctx.local_rank, "host": socket.gethostname(),
            "device": str(ctx.device), "device_type": ctx.accelerator, "device_index": ctx.device_index,
            "matmul": matmuls}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_devices(reports: Sequence[dict[str, Any]], *, expected_type: str | None) -> CheckResult:
    """Every rank runs on its own card of the expected type, and every matmul is correct.

    Args:
        reports: :func:`probe_device` of every rank.
        expected_type: The device type the server should use (``gcu``, ``cuda``, ``cpu``), or None
            to accept the detected one (a CPU run then warns).
    """
    name = "preflight.devices"
    types = sorted({r["device_type"] for r in reports})
    problems = []
    if expected_type is not None:
        wrong = [r["rank"] for r in reports if r["device_type"] != expected_type]
        if wrong:
            problems.append(f"rank(s) {wrong} run on {types}, expected {expected_type}")
    cards: dict[tuple[str, int], list[int]] = {}
    for r in reports:
        if r["device_index"] is not None:
            cards.setdefault((r["host"], r["device_index"]), []).append(r["rank"])
    shared = {f"{host}:{index}": ranks for (host, index), ranks in cards.items() if len(ranks) > 1}
    if shared:
        problems.append(f"ranks share a card: {shared}")
    bad_matmuls = [f"rank {r['rank']} {dtype}: " + (m.get("error") or f"relative error {m['relative_error']:.2g}")
                   for r in reports for dtype, m in r["matmul"].items() if not m["ok"]]
    problems += bad_matmuls[:_LISTED]
    dtypes = sorted({d for r in reports for d in r["matmul"]})
    slowest = {d: min(r["matmul"][d].get("gflops", 0.0) for r in reports) for d in dtypes}
    placement = (f"{len(cards)} distinct card(s)" if cards else "no cards (cpu)")
    figure = f"{len(reports)} rank(s) on {'/'.join(types)}, {placement}; matmul " + ", ".join(
        f"{d} ≥{slowest[d]:.0f} GFLOP/s" for d in dtypes)
    details = {"ranks": list(reports), "shared_cards": shared}
    if problems:
        return failed(name, figure, "; ".join(problems),
                      "launch one process per card (deepspeed --num_gpus N / torchrun --nproc_per_node N), select "
                      "cards with the runtime's visible-devices variable, and check the driver and vendor torch "
                      "package", **details)
    if expected_type is None and types == ["cpu"]:
        return warned(name, figure, "running on CPU: no accelerator was found",
                      "install the accelerator's torch package, or pass --expect-device cpu if CPU is intended",
                      **details)
    return passed(name, figure, f"each rank has its own {types[0]} device and computes correctly in "
                                f"{', '.join(dtypes)}", **details)


# ----------------------------------------------------------------------------------------------
# Collectives


def probe_collectives(ctx: DistributedContext, *, size_bytes: int, iterations: int = 3) -> dict[str, Any]:
    """All-reduce, all-gather and broadcast with known values on this rank, and their bus bandwidth.

    Bus bandwidth follows the nccl-tests convention: all-reduce moves ``2 (n − 1) / n`` and
    all-gather ``(n − 1) / n`` of the buffer per rank.
    """
    world, rank, device = ctx.world_size, ctx.rank, ctx.device
    numel = max(world, size_bytes // 4 // world * world)
    observed: dict[str, Any] = {"rank": rank, "backend": dist.get_backend(), "bytes": numel * 4}

    tensor = torch.full((numel,), float(rank + 1), device=device)
    dist.all_reduce(tensor)
    expected = world * (world + 1) / 2
    observed["all_reduce_ok"] = bool((tensor == expected).all())

    chunk = torch.full((numel // world,), float(rank + 1), device=device)
    gathered = torch.empty(numel, device=device)
    dist.all_gather_into_tensor(gathered, chunk)
    expected_gather = torch.arange(1, world + 1, device=device, dtype=torch.float32).repeat_interleave(numel // world)
    observed["all_gather_ok"] = bool(torch.equal(gathered, expected_gather))

    source = world - 1
    value = torch.full((numel,), float(rank + 100), device=device)
    dist.broadcast(value, src=source)
    observed["broadcast_ok"] = bool((value == source + 100).all())

    factor = {"all_reduce": 2 * (world - 1) / world, "all_gather": (world - 1) / world}
    for op, run in (("all_reduce", lambda: dist.all_reduce(tensor)),
                    ("all_gather", lambda: dist.all_gather_into_tensor(gathered, chunk))):
        dist.barrier()
        synchronize(device)
        started = time.perf_counter()
        for _ in range(iterations):
            run()
        synchronize(device)
        seconds = (time.perf_counter() - started) / iterations
        observed[f"{op}_busbw_gbps"] = numel * 4 * factor[op] / seconds / 1e9 if world > 1 else None
    return observed


def check_collectives(reports: Sequence[dict[str, Any]], *, device_type: str) -> CheckResult:
    """Collectives gave the right values on every rank, on the backend of the device type.

    Args:
        reports: :func:`probe_collectives` of every rank.
        device_type: The device type the job is expected to use (its backend is required).
    """
    name = "preflight.collectives"
    expected_backend = BACKENDS[device_type]
    backends = sorted({r["backend"] for r in reports})
    problems = []
    if backends != [expected_backend]:
        problems.append(f"process group on {backends}, expected {expected_backend} for {device_type}")
    for op in ("all_reduce", "all_gather", "broadcast"):
        wrong = [r["rank"] for r in reports if not r[f"{op}_ok"]]
        if wrong:
            problems.append(f"{op} gave wrong values on rank(s) {wrong}")
    bandwidth = {op: min((r[f"{op}_busbw_gbps"] for r in reports if r[f"{op}_busbw_gbps"] is not None),
                         default=None) for op in ("all_reduce", "all_gather")}
    size_mb = reports[0]["bytes"] / 2**20
    figure = f"{len(reports)} rank(s), {'/'.join(backends)}, {size_mb:.3g} MiB: " + ", ".join(
        f"{op} busbw {'n/a' if bw is None else f'{bw:.2f} GB/s'}" for op, bw in bandwidth.items())
    details = {"ranks": list(reports), "busbw_gbps": bandwidth}
    if problems:
        return failed(name, figure, "; ".join(problems),
                      f"check the interconnect and the {expected_backend} installation; never run on a fallback "
                      "backend", **details)
    if len(reports) == 1:
        return warned(name, figure, "one process: collectives were only run in a world of one",
                      "launch with deepspeed --num_gpus N or torchrun --nproc_per_node N", **details)
    return passed(name, figure, "all-reduce, all-gather and broadcast correct on every rank", **details)


# ----------------------------------------------------------------------------------------------
# Data files


def list_pairs(root: str | Path, split: str, scenes: str = "both") -> list[tuple[Path, Path | None]]:
    """(image, mask or None) of a split folder; masks listed without checking that they exist."""
    pairs = []
    for scene in SCENES[scenes]:
        folder = Path(root) / split / scene
        for image in sorted((folder / IMAGE_DIR).glob("*.png")):
            pairs.append((image, folder / MASK_DIR / image.name if split != "Test" else None))
    return pairs


def orphan_masks(root: str | Path, split: str, scenes: str = "both") -> list[Path]:
    """Mask files of a split folder without an image of the same name."""
    orphans = []
    for scene in SCENES[scenes]:
        folder = Path(root) / split / scene
        orphans += [m for m in sorted((folder / MASK_DIR).glob("*.png")) if not (folder / IMAGE_DIR / m.name).is_file()]
    return orphans


def scan_pair(image: Path, mask: Path | None, *, decode: bool) -> list[str]:
    """Problems of one image/mask pair: missing mask, unreadable or wrong-mode file, size mismatch."""
    from PIL import Image

    problems = []
    try:
        with Image.open(image) as handle:
            image_size = handle.size
        if decode:
            read_rgb_file(image)
    except (OSError, SyntaxError, ValueError) as error:  # DataError is a ValueError
        return [f"{image}: {error}"]
    if mask is None:
        return problems
    if not mask.is_file():
        return [f"{image}: no mask ({mask} is missing)"]
    try:
        with Image.open(mask) as handle:
            mask_size = handle.size
        if decode:
            read_mask_file(mask)
    except (OSError, SyntaxError, ValueError, DataError) as error:
        return [f"{mask}: {error}"]
    if image_size != mask_size:
        problems.append(f"{image} is {image_size[0]}×{image_size[1]} but its mask is {mask_size[0]}×{mask_size[1]}")
    return problems


def check_data_files(problems: Sequence[str], *, pairs: int, decoded: int, full: bool,
                     splits: Sequence[str]) -> CheckResult:
    """Every image has a mask of its size and the files decode.

    Args:
        problems: What :func:`scan_pair` (and the orphan-mask listing) found, over all ranks.
        pairs: Image/mask pairs whose headers were read.
        decoded: Pairs fully decoded.
        full: Whether every pair was decoded.
        splits: The split folders scanned.
    """
    name = "preflight.data_files"
    figure = f"{pairs} pairs in {'/'.join(splits)}, {decoded} decoded" + (" (all)" if full else " (sample)")
    details = {"pairs": pairs, "decoded": decoded, "full": full, "problems": list(problems)[:100]}
    if pairs == 0:
        return failed(name, figure, "no images found", "point --data-root at the folder holding Train/ and Val/")
    if problems:
        more = f" (+{len(problems) - _LISTED} more)" if len(problems) > _LISTED else ""
        return failed(name, figure, f"{len(problems)} problem(s): " + "; ".join(problems[:_LISTED]) + more,
                      "restore the listed files from the official archive", **details)
    return passed(name, figure, "every image has a mask of the same size; files decode", **details)


# ----------------------------------------------------------------------------------------------
# Pretrained checkpoint


def check_checkpoint_keys(report: KeyReport | None, *, is_head: Callable[[str], bool],
                          from_scratch: bool = False) -> CheckResult:
    """The pretrained checkpoint covers everything but the head.

    Args:
        report: The key report of loading the checkpoint into the model (None: no checkpoint).
        is_head: Whether a model key belongs to the (newly initialised) head.
        from_scratch: Without a checkpoint: random weights are intended (``model.pretrained: none``).
    """
    name = "preflight.checkpoint_keys"
    if report is None and from_scratch:
        return passed(name, "no checkpoint", "model.pretrained=none: training from random weights is intended")
    if report is None:
        return warned(name, "no checkpoint", "model.pretrained is not set: the model starts from random weights",
                      "set model.pretrained=/path/to/local/weights, or model.pretrained=none if training from "
                      "scratch is intended")
    missing = [k for k in report.missing if not is_head(k)]
    mismatched = [k for k, _, _ in report.shape_mismatched if not is_head(k)]
    head_missing = len(report.missing) - len(missing)
    figure = (f"{len(report.matched)} matched, {len(report.missing)} missing ({head_missing} head), "
              f"{len(report.unexpected)} unexpected, {len(report.shape_mismatched)} shape-mismatched, "
              f"{len(report.head_skipped)} head tensor(s) skipped (class count)")
    details = {"source": report.source, "matched": len(report.matched), "missing_non_head": missing[:100],
               "shape_mismatched_non_head": mismatched[:100], "unexpected": report.unexpected[:100],
               "head_missing": head_missing, "head_skipped": [k for k, _, _ in report.head_skipped]}
    if missing or mismatched:
        listed = ", ".join((missing + mismatched)[:_LISTED])
        return failed(name, figure, f"{len(missing)} non-head key(s) missing and {len(mismatched)} shape-mismatched "
                                    f"in {report.source}: {listed}",
                      "use the checkpoint of the configured backbone and size (these layers would start random)",
                      **details)
    return passed(name, figure, f"{report.source}: everything but the head is loaded", **details)


def checkpoint_key_report(*, arch: str, size: str, pretrained: str,
                          class_names: Sequence[str]) -> tuple[KeyReport, Callable[[str], bool]]:
    """Load ``pretrained`` the way training does and return its key report, with the head test.

    The checkpoint goes through the same reader, conversion, size cross-check and loader as
    training (:func:`~mapsage_ds.models.factory.build_model`), without ZeRO and with backbone
    problems reported instead of raised, so that the check can list them.

    Raises:
        MissingFileError / DataError / ConfigError: if the checkpoint cannot be read or is not the configured model.
    """
    from mapsage_ds.models.factory import build_model, head_test

    built = build_model(arch=arch, size=size, class_names=list(class_names), pretrained=pretrained, strict=False,
                        normalization={"mean": [0.0] * 3, "std": [1.0] * 3})  # statistics are check 3's concern
    return built.report, head_test(built.layer_id)
