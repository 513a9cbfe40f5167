"""Resumable DeepSpeed checkpoints: model, optimizer, schedule step, RNG and data position.

Layout: ``{root}/step_00001000/`` holds DeepSpeed's files plus one ``rng_rank{r}.pt`` per rank;
``{root}/latest`` names the newest complete checkpoint. DeepSpeed writes ``latest`` only after
every file of a tag is saved, so an interrupted save leaves the previous checkpoint in charge.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from mapsage_ds.errors import MissingFileError
from mapsage_ds.runtime.accelerator import DistributedContext, rng_state, set_rng_state
from mapsage_ds.runtime.engine import average_buffers


def step_tag(step: int) -> str:
    """Checkpoint folder name of an optimizer step."""
    return f"step_{step:08d}"


def save_checkpoint(
    engine: deepspeed.DeepSpeedEngine,
    root: str | Path,
    *,
    step: int,
    client_state: dict[str, Any],
    ctx: DistributedContext,
    keep: int,
    protect: set[str] = frozenset(),
) -> Path:
    """Save a checkpoint on every rank and prune old ones beyond the ``keep`` newest.

    Args:
        engine: the engine to save (every rank calls this).
        root: checkpoint folder of the run.
        step: optimizer steps done; names the checkpoint.
        client_state: train state, data position and config stored with the engine state.
        ctx: this process's place in the job.
        keep: how many checkpoints to keep.
        protect: tags never pruned (the best checkpoint).
    """
    root = Path(root)
    tag = step_tag(step)
    # DeepSpeed stores rank 0's buffers only: agree on them first, so that every rank of a
    # resumed run starts from the same statistics as the uninterrupted run.
    average_buffers(engine.module)
    (root / tag).mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(ctx.device), root / tag / f"rng_rank{ctx.rank}.pt")
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
    if ctx.is_main:
        tags = sorted(p.name for p in root.glob("step_*") if p.is_dir())
        for old in tags[:-keep]:
            if old not in protect:
                shutil.rmtree(root / old, ignore_errors=True)
    dist.barrier()
    return root / tag


def latest_tag(root: str | Path) -> str | None:
    """Tag named by ``{root}/latest``, or None when there is no checkpoint."""
    latest = Path(root) / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def latest_step(root: str | Path) -> int:
    """Optimizer step of the newest checkpoint under ``root``."""
    return int(_resume_tag(root).removeprefix("step_"))


def _resume_tag(root: str | Path) -> str:
    """Tag to resume from; no checkpoint is an error."""
    tag = latest_tag(root)
    if tag is None:
        raise MissingFileError(f"--resume: no checkpoint in {root} (no 'latest' file)")
    return tag


def load_checkpoint(
    engine: deepspeed.DeepSpeedEngine, root: str | Path, *, ctx: DistributedContext
) -> dict[str, Any]:
    """Restore the newest checkpoint under ``root`` into ``engine`` and this rank's RNG.

    Returns:
        The client state saved with it (step, data position, best score, config).
    """
    tag = _resume_tag(root)
    rng_file = Path(root) / tag / f"rng_rank{ctx.rank}.pt"
    if not rng_file.is_file():
        raise MissingFileError(f"--resume: {rng_file} missing; was the run saved with a different world size?")
    path, client_state = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise MissingFileError(f"--resume: DeepSpeed could not load checkpoint {Path(root) / tag}")
    set_rng_state(torch.load(rng_file, weights_only=True), ctx.device)
    return client_state
