"""Teacher outputs precomputed to disk (``teacher.offload_features``), for teachers that do not fit beside the student.

Keying: the cache holds the teacher's outputs for the *exact augmented batches* the run will
train on, not for the raw images. Every sample's augmentation is a pure function of (run seed,
epoch, index) (:class:`~mapsage_ds.data.loaders.TransformedDataset`) and the sampler's order a
pure function of (run seed, epoch, rank), so the training stream is replayable: the cache is
filled by replaying this rank's stream from its start for the planned number of micro-batches
(``max_steps × grad_accum_steps``), running the teacher on each batch, and storing the outputs
under a key derived from the batch itself — its samples' augmentation seeds (``batch["seed"]``)
and its image size. Training then looks batches up by the same key, so random crops, flips,
rotations, colour jitter, multi-scale crops and even CutMix/MixUp (batch-level, seeded by the
same seeds) all match by construction. A per-sample checksum of the input image is stored too
and checked on every lookup, so a stale cache fails loudly instead of teaching wrong targets.

The alternative — caching the teacher's logits on the whole un-augmented image and applying
each crop's geometric transform to them — is cheaper to store but not what the live teacher
computes (a crop changes the teacher's context and padding, and features do not commute with
rotation or resampling), so it could not give the same losses as the live teacher. Storage
cost here: ``planned micro-batches × (logits + features)`` per rank, in the teacher's precision.

Layout: ``{cache_dir}/rank{r:05d}/shard_{k:05d}.safetensors`` with tensors
``{key}.logits``, ``{key}.features`` and ``{key}.checksum``, and ``manifest.json`` (written
last: it marks the rank's cache complete) with a fingerprint of everything the outputs depend
on; a cache whose fingerprint differs is rebuilt.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mapsage_ds.data.loaders import TrainStream, sample_seed
from mapsage_ds.errors import DataError, MissingFileError
from mapsage_ds.models.weights import open_safetensors
from mapsage_ds.tasks.teacher import FrozenTeacher, TeacherOutputs

CACHE_VERSION = 1
MANIFEST = "manifest.json"


def rank_directory(cache_dir: str | Path, rank: int) -> Path:
    """The folder of rank ``rank`` inside the cache."""
    return Path(cache_dir) / f"rank{rank:05d}"


def batch_key(batch: dict[str, Any]) -> str:
    """Key of a training batch: its samples' augmentation seeds and its image size.

    Raises:
        DataError: When the batch carries no ``"seed"`` (it did not come from a TrainTransform).
    """
    if "seed" not in batch:
        raise DataError("teacher.offload_features needs training batches carrying 'seed' "
                        "(the per-sample augmentation seed of TrainTransform)")
    seeds = [int(s) for s in torch.as_tensor(batch["seed"]).reshape(-1).tolist()]
    height, width = batch["image"].shape[-2:]
    return str(sample_seed(*seeds, height, width))


def image_checksum(images: torch.Tensor) -> torch.Tensor:
    """Per-sample (sum, sum of squares) of the input images in float64, shape (N, 2)."""
    values = images.detach().to(torch.float64).flatten(1)
    return torch.stack([values.sum(1), values.square().sum(1)], dim=1).cpu()


def is_complete(cache_dir: str | Path, *, rank: int, fingerprint: dict[str, Any]) -> bool:
    """Whether this rank's cache exists, is complete and was made for ``fingerprint``."""
    manifest = rank_directory(cache_dir, rank) / MANIFEST
    if not manifest.is_file():
        return False
    saved = json.loads(manifest.read_text())
    return saved.get("version") == CACHE_VERSION and saved.get("fingerprint") == _jsonable(fingerprint)


def fill_teacher_cache(
    teacher: FrozenTeacher,
    stream: TrainStream,
    *,
    cache_dir: str | Path,
    rank: int,
    num_batches: int,
    fingerprint: dict[str, Any],
    batches_per_shard: int = 64,
) -> Path:
    """Replay ``stream`` from its start for ``num_batches`` micro-batches and store the teacher's outputs.

    The stream's position is restored afterwards. No collectives: every rank fills its own part.

    Returns:
        This rank's cache directory.
    """
    directory = rank_directory(cache_dir, rank)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    position = stream.state_dict()
    stream.load_state_dict({"epoch": 0, "batch_in_epoch": 0})
    shards, pending = [], {}
    try:
        for index in range(num_batches):
            batch = next(stream)
            key = batch_key(batch)
            outputs = teacher.forward_images(batch["image"])
            pending[f"{key}.checksum"] = image_checksum(batch["image"])
            for name in ("logits", "features"):
                value = getattr(outputs, name)
                if value is not None:
                    pending[f"{key}.{name}"] = value.detach().cpu().contiguous()
            if len(pending) and ((index + 1) % batches_per_shard == 0 or index + 1 == num_batches):
                shards.append(f"shard_{len(shards):05d}.safetensors")
                save_file(pending, str(directory / shards[-1]), metadata={"format": "pt"})
                pending = {}
    finally:
        stream.load_state_dict(position)
    manifest = {"version": CACHE_VERSION, "fingerprint": _jsonable(fingerprint), "shards": shards,
                "batches": num_batches}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return directory


class TeacherCache:
    """Reads a rank's cached teacher outputs back, batch by batch (memory-mapped safetensors shards).

    Args:
        cache_dir: The cache root (the rank's folder is found inside).
        rank: This process's rank.
        device: Where returned tensors go.

    Raises:
        MissingFileError: When the rank's cache is missing or incomplete.
    """

    def __init__(self, cache_dir: str | Path, *, rank: int, device: torch.device) -> None:
        self.directory, self.device = rank_directory(cache_dir, rank), device
        manifest = self.directory / MANIFEST
        if not manifest.is_file():
            raise MissingFileError(f"teacher cache {self.directory} is incomplete ({MANIFEST} is missing)")
        self._handles = [open_safetensors(self.directory / name)
                         for name in json.loads(manifest.read_text())["shards"]]
        self._where = {key: handle for handle in self._handles for key in handle.keys()}

    def __len__(self) -> int:
        return sum(key.endswith(".checksum") for key in self._where)

    def _get(self, name: str) -> torch.Tensor | None:
        handle = self._where.get(name)
        return None if handle is None else handle.get_tensor(name).to(self.device)

    def __call__(self, batch: dict[str, torch.Tensor]) -> TeacherOutputs:
        """The cached teacher outputs of ``batch``.

        Raises:
            DataError: When the batch is not in the cache or its images differ from the cached ones.
        """
        key = batch_key(batch)
        checksum = self._where.get(f"{key}.checksum")
        if checksum is None:
            raise DataError(f"teacher cache {self.directory}: no entry for this batch (key {key}); the cache "
                            "was made for another data order, augmentation or length: delete it to rebuild")
        expected = checksum.get_tensor(f"{key}.checksum")
        actual = image_checksum(batch["image"])
        if not torch.allclose(actual, expected, rtol=1e-6, atol=1e-6):
            raise DataError(f"teacher cache {self.directory}: batch {key} has other images than when it was "
                            "cached (stale cache): delete it to rebuild")
        return TeacherOutputs(logits=self._get(f"{key}.logits"), features=self._get(f"{key}.features"))


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for fingerprint comparison."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))
