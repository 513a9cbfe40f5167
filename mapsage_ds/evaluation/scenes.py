"""Predict georeferenced scenes of any size, streamed window by window, into GeoTIFF class maps.

A scene is read one window at a time (:class:`~mapsage_ds.data.rasters.RasterScene`), windows
are predicted in batches, and their scores are blended into a strip of rows as wide as the scene
and one tile high; rows no later window can touch are finished, turned into class indices and
written to the output at once. Memory therefore depends on the tile and the scene's width, never
on its height, and no whole-scene array exists anywhere: the strip holds ``(C + 1) × tile × width``
``float32`` values (C scores and the blend weight per pixel).

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

Batches are fixed slices of the scene's row-major window list (``window_batch_size`` windows
each, as the in-memory slide cuts them); windows holding nothing but nodata are dropped from their
batch. A batch's make-up therefore depends on positions only, never on what was read before, and
any process that predicts a batch gets the same scores for it.

Processes: scenes are sharded across ranks whole (each rank writes its own files). The scenes left
over (the last ``len(scenes) % world_size``: all of them when there are fewer scenes than ranks) are
shared window by window: the scene's window rows are cut into one band per rank (:func:`row_bands`),
each rank predicts every window touching its band's output rows (bands overlap by ``tile - stride``
input rows), blends them in the one-process order and writes only its own rows to a part file;
rank 0 then copies the parts into the output. Every output pixel is summed from the same windows, in
the same order, from the same batches as in one process, so the files are identical. This needs an
output directory all ranks see (a shared file system); without one, every scene is predicted whole
by one rank, with a warning.

Outputs: ``OUT/NAME.tif``, a Cloud-Optimized GeoTIFF (tiled, DEFLATE, nearest-neighbour overviews)
of class indices with nodata 255, the source's CRS, transform and size, a colour table and the
class names in its metadata; optionally ``OUT/NAME_probabilities.tif``, one ``uint8`` band per
class (probability × 255), and ``OUT/NAME.gpkg``, the class map's polygons (:func:`write_polygons`).
Each file is written under a temporary name and renamed once complete, so an existing output is a
finished one and a re-run skips it.
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
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from mapsage_ds.data.classes import IGNORE_INDEX, LOVEDA_CLASSES, LOVEDA_PALETTE
from mapsage_ds.data.loaders import eval_shard
from mapsage_ds.data.rasters import BandScaling, RasterScene
from mapsage_ds.errors import ConfigError, DataError, MissingFileError
from mapsage_ds.evaluation.predictor import Ensemble, Predictor, eval_mode, window_starts
from mapsage_ds.evaluation.writers import check_distinct_outputs

__all__ = ["BLENDS", "PLAIN_IMAGE_SUFFIXES", "RASTER_SUFFIXES", "SceneResult", "blend_weights", "find_inputs",
           "nodata_fill", "polygons_output", "predict_scene", "predict_scenes", "row_bands", "scene_output_name",
           "write_polygons"]

BLENDS = ("mean", "gaussian", "cosine")
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".img", ".jp2")
PLAIN_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Gaussian bump: sigma as a fraction of the window side (as in nnU-Net's sliding window), and a
# floor so that pixels only one window covers (scene borders) keep a usable weight.
_GAUSSIAN_SIGMA = 0.25
_MIN_WEIGHT = 1e-3
_OUTPUT_BLOCK = 512
# GDAL's block cache defaults to 5% of RAM and keeps every block read or written until full, so on its own
# it grows with the scene up to that; bounded to this, or one window row of blocks when wider.
_GDAL_CACHE_BYTES = 32 * 2**20
# Rows of the strip turned into labels at once.
_EMIT_ROWS = 32
_POLYGON_LAYER_FIELDS = {"class_id": "int", "class_name": "str"}


@dataclass(frozen=True)
class SceneResult:
    """What :func:`predict_scene` did for one scene.

    Attributes:
        output: The class map (written by this rank, or by rank 0 for a scene shared by windows).
        windows: Windows of the whole scene.
        windows_predicted: Windows this rank predicted (its band's, for a scene shared by windows).
        skipped: The output existed: the scene was not predicted again.
        polygons: The GeoPackage of class polygons, when asked for and written by this rank.
    """

    output: Path
    windows: int
    windows_predicted: int
    skipped: bool = False
    polygons: Path | None = None


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


def polygons_output(output: Path) -> Path:
    """The GeoPackage of class polygons beside the class map ``output``: ``NAME.gpkg``."""
    return output.with_suffix(".gpkg")


def row_bands(height: int, tile: int, stride: int, parts: int) -> list[tuple[int, int]]:
    """Output rows ``[top, bottom)`` of each of ``parts`` processes sharing one scene's windows.

    The scene's window rows are cut into ``parts`` contiguous groups of near-equal size; a group
    owns the rows from its first window's top to the next group's first window's top (the last
    group: to the scene's bottom). Bands are contiguous, disjoint and cover every row; with fewer
    window rows than parts, the last bands are empty (``top == bottom``).
    """
    tops = window_starts(height, tile, stride)
    bounds = [len(tops) * i // parts for i in range(parts + 1)]
    edge = [*tops, height]
    return [(edge[a], edge[b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


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
    window touches the rows above ``top``, which are then finished. A strip started at a later row
    (``start``, a band of a scene shared by windows) finishes rows in the same pieces as one that
    started at 0, so each pixel's scores go through the same operations on the same shapes.
    """

    def __init__(self, *, height: int, width: int, rows: int, weights: Tensor | None, logits: bool,
                 write: Callable[[int, np.ndarray, np.ndarray | None], None], probabilities: bool,
                 device: torch.device, start: int = 0) -> None:
        self.height, self.width, self.rows = height, width, rows
        self.weights, self.logits, self.probabilities = weights, logits, probabilities
        self.write, self.device = write, device
        self.top = start  # scene row of buffer row 0
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
                # Rows move up n at a time: source and destination never overlap, and no second strip is allocated.
                for row in range(0, keep, n):
                    m = min(n, keep - row)
                    buffer[..., row:row + m, :] = buffer[..., row + n:row + n + m, :]
                buffer[..., keep:, :] = 0
            self.top += n

    def _emit(self, n: int) -> None:
        valid = self.valid[:n]
        if self.scores is None:
            labels = np.full((n, self.width), IGNORE_INDEX, dtype=np.uint8)
            self.write(self.top, labels, None)
            return
        labels = torch.empty(n, self.width, dtype=torch.uint8, device=self.device)
        probs = (torch.empty(self.scores.shape[0], n, self.width, dtype=torch.uint8, device=self.device)
                 if self.probabilities else None)
        # A few rows at a time: the float temporaries stay small beside the strip, whatever the scene's width.
        for row in range(0, n, _EMIT_ROWS):
            rows = slice(row, min(row + _EMIT_ROWS, n))
            # Uncovered pixels are nodata (only skipped windows held them); the clamp keeps them finite.
            blended = self.scores[:, rows] / self.coverage[rows].clamp_min(_MIN_WEIGHT * _MIN_WEIGHT)
            labels[rows] = blended.argmax(dim=0).to(torch.uint8)
            if probs is not None:
                p = blended.softmax(dim=0) if self.logits else blended
                probs[:, rows] = (p * 255).round().clamp(0, 255).to(torch.uint8)
        labels[~valid] = IGNORE_INDEX
        if probs is not None:
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


def _check_polygon_writer() -> None:
    try:
        import fiona  # noqa: F401
    except ImportError as error:
        raise ConfigError("--polygons writes GeoPackages with fiona, which is not installed: pip install "
                          "'fiona>=1.10' (its wheels carry GDAL)") from error


def _label_profile(scene: RasterScene, *, count: int, rows: tuple[int, int] | None = None) -> dict:
    """A tiled GeoTIFF's profile: the whole scene, georeferenced; or only ``rows`` of it (a part file)."""
    height = scene.height if rows is None else rows[1] - rows[0]
    profile = {"driver": "GTiff", "dtype": "uint8", "count": count, "height": height, "width": scene.width,
               "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate", "BIGTIFF": "IF_SAFER"}
    if scene.crs is not None and rows is None:
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


class _Sink:
    """The label rows (and probabilities) of a scene, or of a band of it, written into tiled GeoTIFFs.

    ``rows``: the scene rows the files hold, ``[top, bottom)``; rows handed to :meth:`write` outside
    them are dropped (a band's strip also finishes rows above its band, which it cannot complete).
    """

    def __init__(self, stack: contextlib.ExitStack, scene: RasterScene, labels: Path, probs: Path | None, *,
                 classes: int, rows: tuple[int, int], part: bool) -> None:
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning

        self.width, self.rows, self.classes = scene.width, rows, classes
        stack.enter_context(warnings.catch_warnings())  # no georeference: warned once by predict_scene
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        profile_rows = rows if part else None
        self.labels = stack.enter_context(rasterio.open(labels, "w", **_label_profile(
            scene, count=1, rows=profile_rows), nodata=255))
        self.probs = None if probs is None else stack.enter_context(rasterio.open(probs, "w", **_label_profile(
            scene, count=classes, rows=profile_rows)))

    def write(self, top: int, labels: np.ndarray, probs: np.ndarray | None) -> None:
        from rasterio.windows import Window

        first, last = max(top, self.rows[0]), min(top + labels.shape[0], self.rows[1])
        if first >= last:
            return
        labels = labels[first - top:last - top]
        window = Window(0, first - self.rows[0], self.width, last - first)
        self.labels.write(labels[None], window=window)
        if self.probs is not None:
            probs = (np.zeros((self.classes, *labels.shape), dtype=np.uint8) if probs is None
                     else probs[:, first - top:last - top])
            self.probs.write(probs, window=window)
            self.probs.write_mask(np.where(labels == IGNORE_INDEX, 0, 255).astype(np.uint8), window=window)

    def describe(self, class_names: Sequence[str], palette: Sequence[tuple[int, int, int]]) -> None:
        """Colour table, band descriptions and class names of a finished scene's files."""
        self.labels.write_colormap(1, {i: (*rgb, 255) for i, rgb in enumerate(palette)})
        self.labels.set_band_description(1, "class index (255: nodata)")
        self.labels.update_tags(**{f"CLASS_{i}": name for i, name in enumerate(class_names)})
        if self.probs is not None:
            for i, name in enumerate(class_names, start=1):
                self.probs.set_band_description(i, f"probability of {name} x 255")


def _part_paths(partial: Path, probs_partial: Path, rank: int) -> tuple[Path, Path]:
    """Rank ``rank``'s part files of a scene shared by windows (hidden, beside the outputs)."""
    return (partial.with_name(f"{partial.name}.rank{rank}.tif"),
            probs_partial.with_name(f"{probs_partial.name}.rank{rank}.tif"))


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
    polygons: bool = False,
    class_names: Sequence[str] = LOVEDA_CLASSES,
    palette: Sequence[tuple[int, int, int]] = LOVEDA_PALETTE,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> SceneResult:
    """Predict one scene into ``output`` (a COG of class indices), streaming windows.

    With ``world_size > 1`` this is a collective: every rank calls it for the same scene, predicts
    its band of rows (:func:`row_bands`) into a part file, and rank 0 assembles the output (and
    the polygons) once all parts are written. ``output``'s folder must be one all ranks see.

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
        polygons: Also write the class polygons, ``NAME.gpkg`` (:func:`write_polygons`).
        class_names: Class names stored in the output's metadata.
        palette: Colour table entries of the classes.
        progress: Show a progress bar in windows.
        rank: This process's rank among those sharing the scene.
        world_size: Processes sharing the scene's windows (1: this process predicts it whole).

    Returns:
        The output path and window counts (this rank's, for ``windows_predicted``).

    Raises:
        ConfigError: On an unknown blend or bad slide geometry.
    """
    import rasterio

    if not 0 < stride <= tile:
        raise ConfigError(f"tile={tile}, stride={stride}: expected 0 < stride <= tile")
    if polygons:
        _check_polygon_writer()
    weights_cpu = blend_weights(blend, min(tile, scene.height), min(tile, scene.width))
    weights = None if weights_cpu is None else weights_cpu.to(device)
    output = Path(output)
    partial = output.with_name(f".{output.name}.partial")
    probs_output = output.with_name(f"{output.stem}_probabilities.tif")
    probs_partial = probs_output.with_name(f".{probs_output.name}.partial")
    if scene.crs is None and rank == 0:
        warnings.warn(f"{scene.path} has no CRS: {output} is written without georeference", stacklevel=2)

    tile_h, tile_w = min(tile, scene.height), min(tile, scene.width)
    tops, lefts = window_starts(scene.height, tile, stride), window_starts(scene.width, tile, stride)
    band = row_bands(scene.height, tile, stride, world_size)[rank]
    stream = dict(tile_size=(tile_h, tile_w), tops=tops, lefts=lefts, window_batch_size=window_batch_size,
                  weights=weights, device=device, classes=len(class_names), progress=progress)
    parts = [_part_paths(partial, probs_partial, r) for r in range(world_size)]
    # The scene's files are rank 0's; another rank only ever removes its own part.
    leftovers = [] if rank else [partial, probs_partial, partial.with_name(f".{output.name}.cog.partial"),
                                 probs_partial.with_name(f".{probs_output.name}.cog.partial")]
    predicted, polygons_path, finished = 0, None, False
    # Enough for a window row of source blocks (3 bands) and output rows, re-read by the next, overlapping row.
    cache = max(_GDAL_CACHE_BYTES, (tile_h + _OUTPUT_BLOCK) * scene.width * 4)
    try:
        with rasterio.Env(GDAL_CACHEMAX=cache):
            if world_size == 1:
                with contextlib.ExitStack() as stack:
                    sink = _Sink(stack, scene, partial, probs_partial if probabilities else None,
                                 classes=len(class_names), rows=band, part=False)
                    predicted = _stream(predictor, scene, sink, band=band, **stream)
                    sink.describe(class_names, palette)
            else:
                own_labels, own_probs = parts[rank]
                if band[0] < band[1]:
                    with contextlib.ExitStack() as stack:
                        sink = _Sink(stack, scene, own_labels, own_probs if probabilities else None,
                                     classes=len(class_names), rows=band, part=True)
                        predicted = _stream(predictor, scene, sink, band=band, **stream)
                dist.barrier()  # every band is written
                if rank == 0:
                    leftovers += [path for pair in parts for path in pair]
                    _assemble(scene, partial, probs_partial if probabilities else None, parts=parts,
                              bands=row_bands(scene.height, tile, stride, world_size), class_names=class_names,
                              palette=palette)
            if rank == 0:
                # Only complete files get the final name: a re-run skips them.
                for source, target in ((partial, output), (probs_partial, probs_output)):
                    if not source.exists():
                        continue
                    staged = target.with_name(f".{target.name}.cog.partial")
                    _to_cog(source, staged)
                    source.unlink()
                    staged.replace(target)
                if polygons:
                    polygons_path = write_polygons(output, polygons_output(output), class_names=class_names)
            finished = True
    finally:  # nothing half-written stays behind
        if not finished and world_size > 1:  # a finished rank's part is rank 0's to read and delete
            leftovers += parts[rank]
        for leftover in leftovers:
            leftover.unlink(missing_ok=True)
    return SceneResult(output=output, windows=len(tops) * len(lefts), windows_predicted=predicted,
                       polygons=polygons_path)


def _assemble(scene: RasterScene, partial: Path, probs_partial: Path | None, *, parts: list[tuple[Path, Path]],
              bands: list[tuple[int, int]], class_names: Sequence[str],
              palette: Sequence[tuple[int, int, int]]) -> None:
    """Copy every rank's band from its part files into the scene's files, a block of rows at a time."""
    import rasterio
    from rasterio.windows import Window

    with contextlib.ExitStack() as stack:
        sink = _Sink(stack, scene, partial, probs_partial, classes=len(class_names), rows=(0, scene.height),
                     part=False)
        for (labels_part, probs_part), (top, bottom) in zip(parts, bands, strict=True):
            if top == bottom:
                continue
            with rasterio.open(labels_part) as labels_src, contextlib.ExitStack() as probs_stack:
                probs_src = None if probs_partial is None else probs_stack.enter_context(rasterio.open(probs_part))
                for offset in range(0, bottom - top, _OUTPUT_BLOCK):
                    window = Window(0, offset, scene.width, min(_OUTPUT_BLOCK, bottom - top - offset))
                    probs = None if probs_src is None else probs_src.read(window=window)
                    sink.write(top + offset, labels_src.read(1, window=window), probs)
        sink.describe(class_names, palette)


def _stream(predictor: Predictor | Ensemble, scene: RasterScene, sink: _Sink, *, band: tuple[int, int],
            tile_size: tuple[int, int], tops: list[int], lefts: list[int], window_batch_size: int,
            weights: Tensor | None, device: torch.device, classes: int, progress: bool) -> int:
    """Read, predict and blend the windows that touch the output rows ``band`` and write those rows to ``sink``.

    Windows are taken in batches that are fixed slices of the scene's row-major window list, so a
    band predicts whole batches, also windows of it that lie outside the band (those are then not
    blended), and every window's scores are those one process gets. Returns the windows predicted.
    """
    tile_h, tile_w = tile_size
    top_row, bottom_row = band
    # Window rows whose windows reach the band: from the first reaching below its top, to the last starting in it.
    first = next(k for k, top in enumerate(tops) if top + tile_h > top_row)
    stop = next((k for k, top in enumerate(tops) if top >= bottom_row), len(tops))
    columns = len(lefts)
    lo, hi = first * columns, stop * columns  # the band's windows, in row-major order
    start = lo - lo % window_batch_size  # whole batches, as one process cuts them
    end = min(len(tops) * columns, -(-hi // window_batch_size) * window_batch_size)
    fill = torch.from_numpy(nodata_fill(predictor)).view(3, 1, 1)
    scorer, are_logits = _window_scorer(predictor)
    strip = _StripWriter(height=scene.height, width=scene.width, rows=tile_h, weights=weights,
                         logits=are_logits, write=sink.write, probabilities=sink.probs is not None, device=device,
                         start=tops[first])
    predicted = 0
    bar = tqdm(total=end - start, desc=f"{scene.path.name}", disable=not progress, unit="window")
    with eval_mode(predictor):
        for batch_start in range(start, end, window_batch_size):
            pending: list[tuple[int, int, int, Tensor, Tensor]] = []
            for index in range(batch_start, min(batch_start + window_batch_size, end)):
                top, left = tops[index // columns], lefts[index % columns]
                image, valid = scene.read(top, left, tile_h, tile_w)
                if valid.any():  # a window of nothing but nodata is no image content; its rows come out 255
                    image, valid = torch.from_numpy(image), torch.from_numpy(valid)
                    pending.append((index, top, left, torch.where(valid, image, fill), valid))
            bar.update(min(window_batch_size, end - batch_start))
            if not pending:
                continue
            scores = scorer(torch.stack([image for *_, image, _ in pending]).to(device))
            if sink.probs is not None and scores.shape[1] != classes:
                raise DataError(f"the model predicts {scores.shape[1]} classes, the output names {classes}")
            predicted += len(pending)
            for (index, top, left, _, valid), window_scores in zip(pending, scores, strict=True):
                if lo <= index < hi:
                    strip.add(top, left, window_scores.float(), valid.to(device))
    bar.close()
    strip.finish(bottom_row)
    return predicted


def write_polygons(raster: str | Path, target: str | Path, *, class_names: Sequence[str] = LOVEDA_CLASSES) -> Path:
    """The class polygons of a class-map raster as a GeoPackage, extracted block by block.

    Each block of ``raster`` (512² in the COGs :func:`predict_scene` writes) is read on its own and
    its connected regions of one class (4-connectivity) become polygons with rasterio's shape
    extraction, so memory stays that of one block whatever the scene's size. A region crossing a
    block border is therefore split there into polygons of the same class that share an edge;
    dissolving by ``class_id`` in a GIS (QGIS "Dissolve", ``geopandas.dissolve``) merges them.
    Nodata (255) gets no polygon. The layer is named after the file, holds ``class_id`` (int) and
    ``class_name`` (text), and has the raster's CRS (none without one: coordinates are then pixels).
    Written under a temporary name and renamed when complete.

    Args:
        raster: A single-band ``uint8`` raster of class indices, 255 for nodata.
        target: The GeoPackage to write (``.gpkg``).
        class_names: Names of the class indices.

    Returns:
        ``target``.

    Raises:
        ConfigError: If fiona (the GeoPackage writer) is not installed.
        DataError: If the raster holds a class index without a name.
    """
    _check_polygon_writer()
    import fiona
    import rasterio
    from rasterio.features import shapes

    target = Path(target)
    partial = target.with_name(f".{target.stem}.partial.gpkg")  # GDAL wants the .gpkg suffix
    schema = {"geometry": "Polygon", "properties": dict(_POLYGON_LAYER_FIELDS)}
    try:
        with rasterio.open(raster) as src:
            crs = {} if src.crs is None else {"crs_wkt": src.crs.to_wkt()}
            with fiona.open(partial, "w", driver="GPKG", layer=target.stem, schema=schema, **crs) as dst:
                for _, window in src.block_windows(1):
                    block = src.read(1, window=window)
                    valid = block != IGNORE_INDEX
                    if not valid.any():
                        continue
                    unnamed = np.unique(block[valid & (block >= len(class_names))])
                    if unnamed.size:
                        raise DataError(f"{raster}: class index {int(unnamed[0])} has no name (classes: "
                                        f"{', '.join(class_names)})")
                    dst.writerecords(
                        {"geometry": geometry, "properties": {"class_id": int(value),
                                                              "class_name": class_names[int(value)]}}
                        for geometry, value in shapes(block, mask=valid, connectivity=4,
                                                      transform=src.window_transform(window)))
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _shared_directory(out_dir: Path, *, rank: int, world_size: int) -> bool:
    """Collective: whether every rank sees the files rank 0 writes in ``out_dir``."""
    probe = out_dir / ".mapsage-shared-probe"
    if rank == 0:
        probe.write_text("")
    dist.barrier()
    seen: list = [None] * world_size
    dist.all_gather_object(seen, probe.is_file())
    dist.barrier()  # every rank has looked before the probe goes
    if rank == 0:
        probe.unlink(missing_ok=True)
    return all(seen)


def _rank0_says(value: bool) -> bool:
    """Collective: rank 0's ``value`` on every rank (decisions all ranks of a shared scene must agree on)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


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
    polygons: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> list[SceneResult]:
    """Predict this rank's share of the scenes ``paths`` into ``out_dir/NAME.tif``.

    With ``N`` ranks, the first ``len(paths) - len(paths) % N`` scenes are sharded across ranks
    whole (each rank writes its own files); the remaining scenes (all of them when there are fewer
    scenes than ranks) are each shared by all ranks, window rows split into bands (see the module
    docstring), which needs ``out_dir`` on a file system every rank sees: when it is not, every
    scene is sharded whole, with a warning. With ranks, this is a collective (all must call it).

    A scene whose output exists is skipped unless ``overwrite``; with ``polygons``, a skipped
    scene whose ``NAME.gpkg`` is missing gets it from the existing class map. Every scene is
    opened and checked (bands, scaling) before any is predicted, so bad input fails before hours
    of work.

    Raises:
        ConfigError: If ``out_dir`` is not writable, a scene needs a scaling, or ``polygons`` is
            asked for without fiona installed.
        DataError: If two scenes share an output name, or a scene is unreadable or lacks a band.
        MissingFileError: If a scene does not exist.
    """
    out_dir = Path(out_dir)
    check_distinct_outputs(paths, scene_output_name)
    for path in paths:
        RasterScene(path, bands=bands, scaling=scaling).close()
    _check_writable(out_dir)
    if polygons:
        _check_polygon_writer()
    whole = len(paths) - len(paths) % world_size
    if whole < len(paths) and not _shared_directory(out_dir, rank=rank, world_size=world_size):
        if rank == 0:
            warnings.warn(f"--output-dir {out_dir} is not one file system for all {world_size} ranks: the last "
                          f"{len(paths) - whole} scene(s) are predicted whole by one rank each, not shared by "
                          "windows", stacklevel=2)
        whole = len(paths)
    settings = dict(tile=tile, stride=stride, window_batch_size=window_batch_size, blend=blend, device=device,
                    probabilities=probabilities, polygons=polygons, progress=progress)
    results = []
    shared = list(range(whole, len(paths)))
    for index in [*eval_shard(whole, rank=rank, world_size=world_size), *shared]:
        path = paths[index]
        output = out_dir / scene_output_name(path)
        ranks = (rank, world_size) if index in shared else (0, 1)
        done = output.exists() and not overwrite
        if ranks[1] > 1:
            done = _rank0_says(done)  # ranks must agree, even if one sees the file rank 0 just wrote
        if done:
            gpkg = polygons_output(output)
            if polygons and ranks[0] == 0 and not gpkg.exists():
                write_polygons(output, gpkg)
            results.append(SceneResult(output=output, windows=0, windows_predicted=0, skipped=True,
                                       polygons=gpkg if polygons and ranks[0] == 0 else None))
            continue
        with RasterScene(path, bands=bands, scaling=scaling) as scene:
            results.append(predict_scene(predictor, scene, output, rank=ranks[0], world_size=ranks[1], **settings))
    return results
