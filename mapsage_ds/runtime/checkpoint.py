"""Resumable DeepSpeed checkpoints: model, optimizer, schedule step, RNG and data position.

Layout: ``{root}/step_00001000/`` holds DeepSpeed's files, one ``rng_rank{r}.pt`` per rank and
``manifest.json``; ``{root}/latest`` names the newest complete checkpoint.

A checkpoint is complete once its manifest is written: the run's id and every file's size and
SHA-256. ``latest`` moves only after that, so an interrupted or failed save leaves the previous
checkpoint in charge, and the failed one is removed. DeepSpeed's loader unpickles its files
(``weights_only=False``), so nothing is handed to it before :func:`verify_checkpoint` has checked
the manifest against the run directory's own id and the files against their recorded hashes:
only checkpoints this run wrote, unchanged since, are loaded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from mapsage_ds.errors import (
    CheckpointError,
    MapSageError,
    MissingFileError,
    StorageError,
    TrainingError,
    on_every_rank,
)
from mapsage_ds.files import human_bytes, write_json, write_text_atomic
from mapsage_ds.runtime.accelerator import DistributedContext, rng_state, set_rng_state
from mapsage_ds.runtime.engine import average_buffers
from mapsage_ds.runtime.failures import raise_if_any_failed

MANIFEST = "manifest.json"
_TAG_PREFIX = "step_"
# Client-state key: names of the parameters in each optimizer group, in DeepSpeed's order. A ZeRO-0
# checkpoint stores its fp32 masters as unnamed per-group lists (``fp32_groups``); these name them.
MASTER_NAMES = "fp32_master_names"


def master_names(engine: deepspeed.DeepSpeedEngine) -> list[list[str]] | None:
    """Names of the fp32 masters a ZeRO-0 mixed-precision optimizer saves, group by group; None otherwise."""
    groups = getattr(engine.optimizer, "fp16_groups", None)
    if groups is None or not hasattr(engine.optimizer, "fp32_groups"):
        return None
    names = {id(param): name for name, param in engine.module.named_parameters()}
    return [[names[id(param)] for param in group] for group in groups]


def read_fp32_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of a checkpoint folder, consolidated from any ZeRO stage (call after :func:`verify_checkpoint`).

    ZeRO-1/2/3 go through DeepSpeed's own consolidation. A ZeRO-0 checkpoint has no partitioned
    optimizer files: its module file holds the weights (the masters themselves in fp32; in bf16/fp16
    the masters are the optimizer's ``fp32_groups``, named by :data:`MASTER_NAMES`), and it is read
    with ``weights_only=True``.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = Path(folder)
    if any(folder.glob("*optim_states.pt")):
        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    saved = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    state = {name: value.float() if value.is_floating_point() else value for name, value in saved["module"].items()}
    names = saved.get(MASTER_NAMES)
    if names is not None:
        masters = saved["optimizer"]["fp32_groups"]
        for group_names, group in zip(names, masters, strict=True):
            state.update(zip(group_names, group, strict=True))
    return state


def step_tag(step: int) -> str:
    """Checkpoint folder name of an optimizer step."""
    return f"{_TAG_PREFIX}{step:08d}"


def tag_step(tag: str) -> int | None:
    """Optimizer step a checkpoint folder name stands for; None for other names."""
    digits = tag.removeprefix(_TAG_PREFIX)
    return int(digits) if tag.startswith(_TAG_PREFIX) and digits.isdigit() else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _gather_objects(value: Any) -> list[Any]:
    if not dist.is_initialized():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _hash_share(folder: Path, names: list[str], rank: int, world_size: int) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of this rank's share of ``names`` (every ``world_size``-th file): ranks hash in parallel."""
    return {name: {"size": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
            for name in names[rank::world_size]}


def _checkpoint_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


@torch.no_grad()
def weights_are_finite(engine: deepspeed.DeepSpeedEngine) -> bool:
    """True when every rank's parameters (its ZeRO-3 shard) are finite; a collective."""
    finite = all(bool(torch.isfinite(getattr(p, "ds_tensor", p)).all()) for p in engine.module.parameters()
                 if p.is_floating_point())
    flag = torch.tensor([1.0 if finite else 0.0], device=next(engine.module.parameters()).device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def estimated_size(engine: deepspeed.DeepSpeedEngine) -> int:
    """Bytes of one checkpoint: the module in its dtype plus fp32 master weights and two Adam moments."""
    total = 0
    for param in engine.module.parameters():
        numel = getattr(param, "ds_numel", param.numel())
        total += numel * param.element_size() + (numel * 12 if param.requires_grad else 0)
    return total


def save_checkpoint(
    engine: deepspeed.DeepSpeedEngine,
    root: str | Path,
    *,
    step: int,
    client_state: dict[str, Any],
    ctx: DistributedContext,
    run_id: str,
    keep: int,
    protect_steps: set[int] = frozenset(),
) -> Path:
    """Save a checkpoint on every rank, then point ``latest`` at it and prune old ones.

    Args:
        engine: the engine to save (every rank calls this).
        root: checkpoint folder of the run.
        step: optimizer steps done; names the checkpoint.
        client_state: train state, data position and config stored with the engine state.
        ctx: this process's place in the job.
        run_id: the run's id (``run.json``), recorded in the manifest.
        keep: how many checkpoints to keep (the newest by step number).
        protect_steps: steps never pruned (the best checkpoint); ``latest`` is never pruned either.

    Raises:
        TrainingError: the weights are not finite (nothing is written; ``latest`` stays).
        StorageError: a write failed (a full disk): the partial checkpoint is removed, ``latest`` stays.
    """
    root = Path(root)
    tag = step_tag(step)
    folder = root / tag
    # DeepSpeed stores rank 0's buffers only: agree on them first, so that every rank of a
    # resumed run starts from the same statistics as the uninterrupted run.
    average_buffers(engine.module)
    if not weights_are_finite(engine):
        previous = latest_tag(root)
        raise on_every_rank(TrainingError(
            f"step {step}: the model's weights are not finite (NaN or inf), so no checkpoint was written; "
            f"the last good checkpoint is {root / previous if previous else 'none (no checkpoint yet)'}"))
    error = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(ctx.device), folder / f"rng_rank{ctx.rank}.pt")
    except (OSError, RuntimeError) as failure:
        error = failure
    _agree_on_write(error, engine, root, folder)
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as failure:
        error = failure
        # The ranks that finished wait in DeepSpeed's closing barrier; this one joins them there.
        dist.barrier()
    _agree_on_write(error, engine, root, folder)
    names = _checkpoint_files(folder)
    shares = _gather_objects(_hash_share(folder, names, ctx.rank, ctx.world_size))
    if ctx.is_main:
        files = {name: entry for share in shares for name, entry in share.items()}
        try:
            write_json(folder / MANIFEST, {"run_id": run_id, "step": step, "world_size": ctx.world_size,
                                           "files": dict(sorted(files.items()))})
            write_text_atomic(root / "latest", tag)
        except OSError as failure:
            error = failure
    _agree_on_write(error, engine, root, folder)
    if ctx.is_main:
        prune_checkpoints(root, keep=keep, protect_steps={*protect_steps, step})
    dist.barrier()
    return folder


def _agree_on_write(error: BaseException | None, engine: deepspeed.DeepSpeedEngine, root: Path, folder: Path) -> None:
    """Collective: when any rank failed to write, remove the partial checkpoint and stop every rank."""
    failure = None
    if error is not None:
        free, needed = shutil.disk_usage(root).free, estimated_size(engine)
        full = "the file system is full: " if free < needed else ""
        failure = StorageError(
            f"writing checkpoint {folder} failed ({error}); {full}{human_bytes(free)} free on that file system, "
            f"a checkpoint of this run takes about {human_bytes(needed)}. The partial checkpoint was "
            f"removed and 'latest' still names {latest_tag(root) or 'no checkpoint'}: free space (or move "
            f"output_dir) and continue with --resume")
    def remove_partial() -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            shutil.rmtree(folder, ignore_errors=True)

    raise_if_any_failed(failure, on_failure=remove_partial)


def prune_checkpoints(root: str | Path, *, keep: int, protect_steps: set[int]) -> None:
    """Remove checkpoints beyond the ``keep`` newest by step number, sparing ``latest`` and ``protect_steps``."""
    root = Path(root)
    latest = latest_tag(root)
    steps = sorted(s for p in root.iterdir() if p.is_dir() and (s := tag_step(p.name)) is not None)
    for step in steps[:-keep] if keep > 0 else steps:
        if step not in protect_steps and step_tag(step) != latest:
            shutil.rmtree(root / step_tag(step), ignore_errors=True)


def remove_incomplete(root: str | Path) -> list[Path]:
    """Delete checkpoint folders without a manifest or newer than ``latest`` (left by an interrupted save)."""
    root = Path(root)
    if not root.is_dir():
        return []
    latest = latest_tag(root)
    latest_step = tag_step(latest) if latest else -1
    removed = []
    for folder in sorted(root.iterdir()):
        step = tag_step(folder.name)
        if folder.is_dir() and step is not None and (step > latest_step or not (folder / MANIFEST).is_file()):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def latest_tag(root: str | Path) -> str | None:
    """Tag named by ``{root}/latest``, or None when there is no checkpoint."""
    latest = Path(root) / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def latest_step(root: str | Path) -> int:
    """Optimizer step of the newest checkpoint under ``root``."""
    tag = _resume_tag(root)
    step = tag_step(tag)
    if step is None:
        raise CheckpointError(f"{Path(root) / 'latest'} names {tag!r}: expected a checkpoint folder like "
                              f"{step_tag(100)}")
    return step


def _resume_tag(root: str | Path) -> str:
    """Tag to resume from; no checkpoint is an error."""
    tag = latest_tag(root)
    if tag is None:
        raise MissingFileError(f"--resume: no checkpoint in {root} (no 'latest' file)")
    return tag


def verify_checkpoint(folder: str | Path, *, run_id: str | None, rank: int = 0, world_size: int = 1) -> None:
    """Check a checkpoint folder against its manifest before anything in it is unpickled; a collective.

    Args:
        folder: ``{root}/step_XXXXXXXX``.
        run_id: the id in the run directory's ``run.json`` (the manifest must carry it).
        rank: this rank; it hashes every ``world_size``-th file from its own index.
        world_size: ranks sharing the work (1: this process hashes every file).

    Raises:
        CheckpointError: no manifest, another run's id, a missing, extra or changed file.
    """
    folder = Path(folder)
    error: MapSageError | None = None
    manifest_file = folder / MANIFEST
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as failure:
        manifest, files = None, {}
        error = CheckpointError(
            f"{manifest_file}: missing or unreadable ({failure}); only checkpoints written by a MapSage DS run "
            f"into this directory are loaded, since loading one unpickles its files")
    if manifest is not None and manifest.get("run_id") != run_id:
        error = CheckpointError(
            f"{folder} was written by run {manifest.get('run_id')!r}, not by the run that owns this directory "
            f"({run_id!r} in run.json): refusing to unpickle another run's files")
    if error is None:
        present = _checkpoint_files(folder)
        if sorted(files) != present:
            extra, missing = sorted(set(present) - set(files)), sorted(set(files) - set(present))
            error = CheckpointError(f"{folder}: files differ from its manifest (extra: {extra[:5]}, "
                                    f"missing: {missing[:5]})")
        else:
            names = sorted(files)
            for name in names[rank::world_size]:
                path = folder / name
                if path.stat().st_size != files[name]["size"] or _sha256(path) != files[name]["sha256"]:
                    error = CheckpointError(f"{path} changed since the run wrote it (size or SHA-256 differs from "
                                            f"{manifest_file}): refusing to unpickle it")
                    break
    raise_if_any_failed(error)


def load_checkpoint(
    engine: deepspeed.DeepSpeedEngine, root: str | Path, *, ctx: DistributedContext, run_id: str
) -> dict[str, Any]:
    """Verify, then restore the newest checkpoint under ``root`` into ``engine`` and this rank's RNG.

    Returns:
        The client state saved with it (step, data position, best score, config).
    """
    tag = _resume_tag(root)
    folder = Path(root) / tag
    verify_checkpoint(folder, run_id=run_id, rank=ctx.rank, world_size=ctx.world_size)
    saved_world = json.loads((folder / MANIFEST).read_text()).get("world_size")
    if saved_world != ctx.world_size:
        raise on_every_rank(CheckpointError(
            f"--resume: {folder} was saved by {saved_world} processes, this run has {ctx.world_size}: the data "
            f"order and RNG streams are per rank, so resume with the same number of processes"))
    path, client_state = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise on_every_rank(CheckpointError(f"--resume: DeepSpeed could not load checkpoint {folder}"))
    set_rng_state(torch.load(folder / f"rng_rank{ctx.rank}.pt", weights_only=True), ctx.device)
    return client_state
