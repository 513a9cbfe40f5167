"""Predict georeferenced scenes of any size, streamed window by window, into GeoTIFF class maps.

A scene is read one window at a time (:class:`~mapsage_ds.data.rasters.RasterScene`), windows
are predicted in batches, and their scores are blended into a strip of rows as wide as the scene
and one tile high; rows no later window can touch are finished, turned into class indices and
written to the output at once. Memory therefore depends on the tile and the scene's width, never
on its height, and no whole-scene array exists anywhere.

Windows and blending:
    * Window origins are those of evaluation's sliding window (:func:`window_starts`, every
      ``stride``, the last flush with the edge), visited row by row and batched in the same
      order, so ``blend="mean"`` (the sum of the window logits over a pixel divided by its
      window count) is bitwise the in-memory ``Predictor`` in slide mode on the same pixels.
    * ``blend="gaussian"`` / ``"cosine"`` weight each window's scores by a smooth bump that is
      highest at its centre, so a pixel near one window's edge takes its score mostly from the
      window it is central in, which removes the seams at window borders.
    * TTA views (scales × flips of the protocol) are applied to each window: a scene is never
      resized whole. Without TTA the result is the evaluation protocol's exactly.
    * Ensembles blend the members' weighted probabilities; a single model blends logits.

Nodata (the raster's nodata value, mask or alpha band) never reaches the model as image
content: those pixels are set to the model's mean colour (zero after its normalisation), windows
holding nothing but nodata are skipped, and the output holds 255 there.

Outputs: ``OUT/NAME.tif``, a Cloud-Optimized GeoTIFF (tiled, DEFLATE, nearest-neighbour overviews)
of class indices with nodata 255, the source's CRS, transform and size, a colour table and the
class names in its metadata; optionally ``OUT/NAME_probabilities.tif``, one ``uint8`` band per
class (probability × 255). Each file is written under a temporary name and renamed once complete,
so an existing output is a finished one and a re-run skips it.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from mapsage_ds.data.classes import IGNORE_INDEX, LOVEDA_CLASSES, LOVEDA_PALETTE
from mapsage_ds.data.loaders import eval_shard
from mapsage_ds.data.rasters import BandScaling, RasterScene
from mapsage_ds.errors import ConfigError, DataError, MissingFileError
from mapsage_ds.evaluation.predictor import Ensemble, Predictor, eval_mode, window_starts
from mapsage_ds.evaluation.writers import check_distinct_outputs

__all__ = ["BLENDS", "PLAIN_IMAGE_SUFFIXES", "RASTER_SUFFIXES", "SceneResult", "blend_weights", "find_inputs",
           "nodata_fill", "predict_scene", "predict_scenes", "scene_output_name"]

BLENDS = ("mean", "gaussian", "cosine")
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".img", ".jp2")
PLAIN_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Gaussian bump: sigma as a fraction of the window side (as in nnU-Net's sliding window), and a
# floor so that pixels only one window covers (scene borders) keep a usable weight.
_GAUSSIAN_SIGMA = 0.25
_MIN_WEIGHT = 1e-3
_OUTPUT_BLOCK = 512


@dataclass(frozen=True)
class SceneResult:
    """What :func:`predict_scene` did for one scene."""

    output: Path
    windows: int
    windows_predicted: int
    skipped: bool = False


def find_inputs(spec: str | Path) -> list[Path]:
    """The files ``spec`` names: one file, a folder's rasters and images (not recursive), or a glob.

    Raises:
        MissingFileError: If nothing matches.
    """
    path = Path(spec)
    if path.is_file():
        return [path]
    known = RASTER_SUFFIXES + PLAIN_IMAGE_SUFFIXES
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in known)
        if not files:
            raise MissingFileError(f"--input {spec}: the folder holds no raster or image ({', '.join(known)})")
        return files
    if glob.has_magic(str(spec)):
        files = sorted(Path(p) for p in glob.glob(str(spec)) if Path(p).is_file())
        if not files:
            raise MissingFileError(f"--input {spec!r}: the pattern matches no file")
        return files
    raise MissingFileError(f"--input {spec}: no such file or folder")


def scene_output_name(path: Path) -> str:
    """Output file name of a scene: its stem with ``.tif``."""
    return f"{path.stem}.tif"


def blend_weights(blend: str, height: int, width: int) -> Tensor | None:
    """Per-pixel weight of one window's scores, ``float32 [height, width]``; None for ``mean`` (all ones).

    Both smooth weightings are separable products of a 1-D bump along each side, peaking at the
    window centre and floored at ``1e-3`` of the peak.

    Raises:
        ConfigError: On an unknown blend.
    """
    if blend == "mean":
        return None
    if blend not in BLENDS:
        raise ConfigError(f"--blend {blend!r}: expected one of {', '.join(BLENDS)}")

    def bump(n: int) -> Tensor:
        centre = torch.arange(n, dtype=torch.float64) + 0.5 - n / 2
        if blend == "gaussian":
            return torch.exp(-0.5 * (centre / (_GAUSSIAN_SIGMA * n)) ** 2)
        return torch.cos(math.pi * centre / n) ** 2  # Hann window, > 0 at the half-pixel offsets

    weights = bump(height)[:, None] * bump(width)[None, :]
    return (weights / weights.max()).clamp_min(_MIN_WEIGHT).float()


def nodata_fill(predictor: Predictor | Ensemble) -> np.ndarray:
    """``uint8 [3]`` colour put in place of nodata: the (first) model's mean, zero once normalised."""
    first = predictor.members[0][0] if isinstance(predictor, Ensemble) else predictor
    if first.normalize is None:
        raise ConfigError("scene prediction feeds raw uint8 windows: the predictor needs its normalisation")
    return np.array([round(m * 255) for m in first.normalize.mean], dtype=np.uint8)


def _window_scorer(predictor: Predictor | Ensemble) -> tuple[Callable[[Tensor], Tensor], bool]:
    """Scores of a batch of windows with the predictor's TTA, and whether they are logits.

    The predictor's own slide settings are left out: here the scene is what is slid over.
    """

    def whole(p: Predictor) -> Predictor:
        return Predictor(p.forward, normalize=p.normalize, protocol=replace(p.protocol, mode="whole"),
                         module=p.module)

    if isinstance(predictor, Ensemble):
        return Ensemble([(whole(p), w) for p, w in predictor.members]).probabilities, False
    return whole(predictor).logits, True


class _StripWriter:
    """Rows of blended scores, one window high and the scene wide; finished rows go to the output.

    ``add`` takes the windows in row-major order; when a window starts at row ``top``, no later
    window touches the rows above ``top``, which are then finished.
    """

    def __init__(self, *, height: int, width: int, rows: int, weights: Tensor | None, logits: bool,
                 write: Callable[[int, np.ndarray, np.ndarray | None], None], probabilities: bool,
                 device: torch.device) -> None:
        self.height, self.width, self.rows = height, width, rows
        self.weights, self.logits, self.probabilities = weights, logits, probabilities
        self.write, self.device = write, device
        self.top = 0  # scene row of buffer row 0
        self.scores: Tensor | None = None  # [C, rows, width], allocated at the first window
        self.coverage = torch.zeros(rows, width, device=device)
        self.valid = torch.zeros(rows, width, dtype=torch.bool, device=device)

    def add(self, top: int, left: int, scores: Tensor, valid: Tensor) -> None:
        self.finish(top)
        if self.scores is None:
            self.scores = torch.zeros(scores.shape[0], self.rows, self.width, device=self.device)
        h, w = scores.shape[-2:]
        r = top - self.top
        region = (slice(r, r + h), slice(left, left + w))
        if self.weights is None:
            self.scores[:, region[0], region[1]] += scores
            self.coverage[region] += 1
        else:
            self.scores[:, region[0], region[1]] += scores * self.weights
            self.coverage[region] += self.weights
        self.valid[region] = valid

    def finish(self, upto: int) -> None:
        """Write every row above ``upto`` (scene rows) and move the strip down."""
        upto = min(upto, self.height)
        while self.top < upto:
            n = min(upto - self.top, self.rows)
            self._emit(n)
            keep = self.rows - n
            for buffer in (self.scores, self.coverage, self.valid):
                if buffer is None:
                    continue
                buffer[..., :keep, :] = buffer[..., n:, :].clone()
                buffer[..., keep:, :] = 0
            self.top += n

    def _emit(self, n: int) -> None:
        valid = self.valid[:n]
        if self.scores is None:
            labels = np.full((n, self.width), IGNORE_INDEX, dtype=np.uint8)
            self.write(self.top, labels, None)
            return
        # Uncovered pixels are nodata (only skipped windows held them); the clamp keeps them finite.
        blended = self.scores[:, :n] / self.coverage[:n].clamp_min(_MIN_WEIGHT * _MIN_WEIGHT)
        labels = blended.argmax(dim=0).to(torch.uint8)
        labels[~valid] = IGNORE_INDEX
        probs = None
        if self.probabilities:
            p = blended.softmax(dim=0) if self.logits else blended
            probs = (p * 255).round().clamp(0, 255).to(torch.uint8)
            probs[:, ~valid] = 0
            probs = probs.cpu().numpy()
        self.write(self.top, labels.cpu().numpy(), probs)


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".mapsage-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"--output-dir {out_dir}: not writable ({error.strerror or error})") from error


def _label_profile(scene: RasterScene, *, count: int) -> dict:
    profile = {"driver": "GTiff", "dtype": "uint8", "count": count, "height": scene.height, "width": scene.width,
               "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate", "BIGTIFF": "IF_SAFER"}
    if scene.crs is not None:
        profile.update(crs=scene.crs, transform=scene.transform)
    return profile


def _to_cog(source: Path, target: Path) -> None:
    """Copy a finished tiled GeoTIFF into COG layout (GDAL streams it block by block)."""
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.shutil import copy as raster_copy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        raster_copy(source, target, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=_OUTPUT_BLOCK,
                    OVERVIEW_RESAMPLING="NEAREST", BIGTIFF="IF_SAFER")


@torch.no_grad()
def predict_scene(
    predictor: Predictor | Ensemble,
    scene: RasterScene,
    output: str | Path,
    *,
    tile: int,
    stride: int,
    window_batch_size: int,
    blend: str = "mean",
    device: torch.device,
    probabilities: bool = False,
    class_names: Sequence[str] = LOVEDA_CLASSES,
    palette: Sequence[tuple[int, int, int]] = LOVEDA_PALETTE,
    progress: bool = True,
) -> SceneResult:
    """Predict one scene into ``output`` (a COG of class indices), streaming windows.

    Args:
        predictor: A model (blended logits) or an ensemble (blended probabilities); its TTA
            views are applied to each window.
        scene: The opened raster.
        output: The class-map file; ``NAME_probabilities.tif`` beside it with ``probabilities``.
        tile: Window side (a scene side shorter than ``tile`` is one window).
        stride: Step between window origins, ``0 < stride <= tile``.
        window_batch_size: Windows per forward.
        blend: ``mean``, ``gaussian`` or ``cosine`` (see the module docstring).
        device: Where windows are predicted and blended.
        probabilities: Also write per-class probabilities × 255.
        class_names: Class names stored in the output's metadata.
        palette: Colour table entries of the classes.
        progress: Show a progress bar in windows.

    Returns:
        The output path and window counts.

    Raises:
        ConfigError: On an unknown blend or bad slide geometry.
    """
    if not 0 < stride <= tile:
        raise ConfigError(f"tile={tile}, stride={stride}: expected 0 < stride <= tile")
    weights_cpu = blend_weights(blend, min(tile, scene.height), min(tile, scene.width))
    weights = None if weights_cpu is None else weights_cpu.to(device)
    output = Path(output)
    partial = output.with_name(f".{output.name}.partial")
    probs_output = output.with_name(f"{output.stem}_probabilities.tif")
    probs_partial = probs_output.with_name(f".{probs_output.name}.partial")
    if scene.crs is None:
        warnings.warn(f"{scene.path} has no CRS: {output} is written without georeference", stacklevel=2)

    tile_h, tile_w = min(tile, scene.height), min(tile, scene.width)
    origins = [(top, left) for top in window_starts(scene.height, tile, stride)
               for left in window_starts(scene.width, tile, stride)]
    predicted = 0
    try:
        predicted = _stream(predictor, scene, partial, probs_partial if probabilities else None, origins=origins,
                            tile_size=(tile_h, tile_w), window_batch_size=window_batch_size, weights=weights,
                            device=device, class_names=class_names, palette=palette, progress=progress)
        # Only complete files get the final name: a re-run skips them.
        for source, target in ((partial, output), (probs_partial, probs_output)):
            if not source.exists():
                continue
            staged = target.with_name(f".{target.name}.cog.partial")
            _to_cog(source, staged)
            source.unlink()
            staged.replace(target)
    finally:  # nothing half-written stays behind
        for leftover in (partial, probs_partial, partial.with_name(f".{output.name}.cog.partial"),
                         probs_partial.with_name(f".{probs_output.name}.cog.partial")):
            leftover.unlink(missing_ok=True)
    return SceneResult(output=output, windows=len(origins), windows_predicted=predicted)


def _stream(predictor: Predictor | Ensemble, scene: RasterScene, partial: Path, probs_partial: Path | None, *,
            origins: list[tuple[int, int]], tile_size: tuple[int, int], window_batch_size: int,
            weights: Tensor | None, device: torch.device, class_names: Sequence[str],
            palette: Sequence[tuple[int, int, int]], progress: bool) -> int:
    """Read, predict, blend and write every window of ``scene`` into ``partial``; returns windows predicted."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.windows import Window

    tile_h, tile_w = tile_size
    probabilities = probs_partial is not None
    fill = torch.from_numpy(nodata_fill(predictor)).view(3, 1, 1)
    scorer, are_logits = _window_scorer(predictor)
    predicted = 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())  # no georeference: warned once by predict_scene
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        labels_dst = stack.enter_context(rasterio.open(partial, "w", **_label_profile(scene, count=1), nodata=255))
        probs_dst = None
        if probabilities:
            probs_dst = stack.enter_context(rasterio.open(probs_partial, "w", **_label_profile(
                scene, count=len(class_names))))

        def write(top: int, labels: np.ndarray, probs: np.ndarray | None) -> None:
            window = Window(0, top, scene.width, labels.shape[0])
            labels_dst.write(labels[None], window=window)
            if probs_dst is not None:
                if probs is None:
                    probs = np.zeros((len(class_names), *labels.shape), dtype=np.uint8)
                probs_dst.write(probs, window=window)
                probs_dst.write_mask(np.where(labels == IGNORE_INDEX, 0, 255).astype(np.uint8), window=window)

        strip = _StripWriter(height=scene.height, width=scene.width, rows=tile_h, weights=weights,
                             logits=are_logits, write=write, probabilities=probabilities, device=device)
        pending: list[tuple[int, int, Tensor, Tensor]] = []

        def run_batch() -> None:
            nonlocal predicted
            batch = torch.stack([image for _, _, image, _ in pending]).to(device)
            scores = scorer(batch)
            if probs_dst is not None and scores.shape[1] != len(class_names):
                raise DataError(f"the model predicts {scores.shape[1]} classes, the output names "
                                f"{len(class_names)}: {', '.join(class_names)}")
            for (top, left, _, valid), window_scores in zip(pending, scores, strict=True):
                strip.add(top, left, window_scores.float(), valid.to(device))
            predicted += len(pending)
            pending.clear()

        bar = tqdm(origins, desc=f"{scene.path.name}", disable=not progress, unit="window")
        with eval_mode(predictor):
            for top, left in bar:
                image, valid = scene.read(top, left, tile_h, tile_w)
                if not valid.any():
                    continue  # nothing but nodata: not image content, and its rows come out 255
                image, valid = torch.from_numpy(image), torch.from_numpy(valid)
                image = torch.where(valid, image, fill)
                pending.append((top, left, image, valid))
                if len(pending) == window_batch_size:
                    run_batch()
            if pending:
                run_batch()
        strip.finish(scene.height)
        labels_dst.write_colormap(1, {i: (*rgb, 255) for i, rgb in enumerate(palette)})
        labels_dst.set_band_description(1, "class index (255: nodata)")
        labels_dst.update_tags(**{f"CLASS_{i}": name for i, name in enumerate(class_names)})
        if probs_dst is not None:
            for i, name in enumerate(class_names, start=1):
                probs_dst.set_band_description(i, f"probability of {name} x 255")
    return predicted


def predict_scenes(
    predictor: Predictor | Ensemble,
    paths: Sequence[Path],
    out_dir: str | Path,
    *,
    tile: int,
    stride: int,
    window_batch_size: int,
    blend: str = "mean",
    bands: tuple[int, int, int] | None = None,
    scaling: BandScaling | None = None,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    probabilities: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> list[SceneResult]:
    """Predict this rank's share of the scenes ``paths`` into ``out_dir/NAME.tif``.

    Scenes are sharded across ranks (each rank writes its own files; no collective runs). A
    scene whose output exists is skipped unless ``overwrite``. Every scene is opened and checked
    (bands, scaling) before any is predicted, so bad input fails before hours of work.

    Raises:
        ConfigError: If ``out_dir`` is not writable, or a scene needs a scaling.
        DataError: If two scenes share an output name, or a scene is unreadable or lacks a band.
        MissingFileError: If a scene does not exist.
    """
    out_dir = Path(out_dir)
    check_distinct_outputs(paths, scene_output_name)
    for path in paths:
        RasterScene(path, bands=bands, scaling=scaling).close()
    _check_writable(out_dir)
    results = []
    for index in eval_shard(len(paths), rank=rank, world_size=world_size):
        path = paths[index]
        output = out_dir / scene_output_name(path)
        if output.exists() and not overwrite:
            results.append(SceneResult(output=output, windows=0, windows_predicted=0, skipped=True))
            continue
        with RasterScene(path, bands=bands, scaling=scaling) as scene:
            results.append(predict_scene(predictor, scene, output, tile=tile, stride=stride,
                                         window_batch_size=window_batch_size, blend=blend, device=device,
                                         probabilities=probabilities, progress=progress))
    return results
