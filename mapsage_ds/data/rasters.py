"""Georeferenced scenes read window by window: band selection, scaling to ``uint8``, nodata masks.

A scene of 50,000 px a side does not fit in memory as one array, so a :class:`RasterScene`
never reads more than the window it is asked for (rasterio/GDAL read only the blocks that
window touches). Each read returns the model's input, ``uint8 [3, h, w]``, and a validity mask
``bool [h, w]``: a pixel is invalid where GDAL's masks say so for all selected bands (the
convention of GDAL's dataset mask), which covers the raster's nodata value, an internal or sidecar
mask, and an alpha band.

Bands and scaling (see :class:`BandScaling`):
    * ``bands``: three 1-based band indexes, in the order the model's R, G, B channels take
      them (``(3, 2, 1)`` for a B, G, R, NIR raster); default: the first three bands that are
      not alpha. A one-band raster needs ``bands=(1, 1, 1)`` explicitly.
    * ``uint8`` rasters are taken as they are unless a scaling is given; any other data type
      (16-bit, float) needs one: a fixed range ``LOW,HIGH`` or percentiles ``pLOW,pHIGH``
      computed per band over the valid pixels of a decimated read of the scene (GDAL uses the
      overviews when there are any). Values map linearly to 0..255 and are clipped.

The model's own normalisation is applied afterwards, by the predictor, to these ``uint8`` values.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mapsage_ds.errors import ConfigError, DataError, MissingFileError

__all__ = ["BandScaling", "RasterScene", "parse_bands", "parse_scaling"]

# Longest side of the decimated read percentiles are computed from.
_STATS_SIDE = 1024
_PERCENTILE = re.compile(r"^\s*p(\d+(?:\.\d*)?)\s*,\s*p(\d+(?:\.\d*)?)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class BandScaling:
    """How raster values become ``uint8``.

    Attributes:
        kind: ``"none"`` (``uint8`` rasters only), ``"range"`` (``low``..``high`` map to 0..255)
            or ``"percentile"`` (the per-band ``low``-th..``high``-th percentiles map to 0..255).
        low: Lower value or percentile.
        high: Upper value or percentile.
    """

    kind: str = "none"
    low: float = 0.0
    high: float = 255.0

    def __post_init__(self) -> None:
        if self.kind not in ("none", "range", "percentile"):
            raise ConfigError(f"scaling {self.kind!r}: expected none, range or percentile")
        if self.kind != "none" and not self.low < self.high:
            raise ConfigError(f"--scale {self.describe()}: expected LOW < HIGH")
        if self.kind == "percentile" and not (0 <= self.low and self.high <= 100):
            raise ConfigError(f"--scale {self.describe()}: percentiles must lie in 0..100")

    def describe(self) -> str:
        """The ``--scale`` spelling of this scaling."""
        if self.kind == "none":
            return "none"
        prefix = "p" if self.kind == "percentile" else ""
        return f"{prefix}{self.low:g},{prefix}{self.high:g}"


def parse_bands(text: str | None) -> tuple[int, int, int] | None:
    """``"3,2,1"`` -> ``(3, 2, 1)``; None stays None (the default bands).

    Raises:
        ConfigError: Unless the text is three integers >= 1.
    """
    if text is None:
        return None
    try:
        bands = tuple(int(part) for part in text.split(","))
    except ValueError as error:
        raise ConfigError(f"--bands {text!r}: expected three comma-separated band numbers, e.g. 3,2,1") from error
    if len(bands) != 3 or any(b < 1 for b in bands):
        raise ConfigError(f"--bands {text!r}: expected three band numbers >= 1 (1-based, as in GDAL), e.g. 3,2,1")
    return bands


def parse_scaling(text: str | None) -> BandScaling | None:
    """``"0,3000"`` -> a fixed range, ``"p2,p98"`` -> percentiles, ``"none"`` -> no scaling; None stays None.

    Raises:
        ConfigError: On any other spelling.
    """
    if text is None:
        return None
    if text.strip().lower() == "none":
        return BandScaling("none")
    match = _PERCENTILE.match(text)
    if match:
        return BandScaling("percentile", float(match[1]), float(match[2]))
    parts = text.split(",")
    try:
        low, high = (float(p) for p in parts)
    except ValueError as error:
        raise ConfigError(f"--scale {text!r}: expected LOW,HIGH (e.g. 0,3000), pLOW,pHIGH (e.g. p2,p98) "
                          "or none") from error
    return BandScaling("range", low, high)


class RasterScene:
    """One raster opened with rasterio, read window by window.

    Args:
        path: Any raster GDAL reads (GeoTIFF, COG, VRT, ...).
        bands: Three 1-based band indexes (see the module docstring); None: the first three
            non-alpha bands.
        scaling: None or ``BandScaling("none")`` for ``uint8`` rasters; required otherwise.

    Attributes:
        height, width: Scene size in pixels.
        crs, transform: Georeference (``crs`` is None for an image without one).
        window_reads: ``(height, width)`` of every window read so far (memory checks).

    Raises:
        MissingFileError: If ``path`` does not exist.
        DataError: If it is not a raster GDAL can open, a band is out of range, or the bands
            cannot be chosen by default.
        ConfigError: If a non-``uint8`` raster comes without a scaling.
    """

    def __init__(self, path: str | Path, *, bands: tuple[int, int, int] | None = None,
                 scaling: BandScaling | None = None) -> None:
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFileError(f"raster not found: {self.path}")
        try:
            with warnings.catch_warnings():  # a scene without georeference is reported once, by the caller
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self._dataset = rasterio.open(self.path)
        except RasterioIOError as error:
            raise DataError(f"{self.path}: not a raster GDAL can read ({error})") from error
        try:
            self.bands = self._choose_bands(bands)
            self.scaling = self._choose_scaling(scaling)
            self._ranges = self._value_ranges()
        except Exception:
            self._dataset.close()
            raise
        self.height, self.width = self._dataset.height, self._dataset.width
        self.crs, self.transform = self._dataset.crs, self._dataset.transform
        self.window_reads: list[tuple[int, int]] = []

    def _choose_bands(self, bands: tuple[int, int, int] | None) -> tuple[int, int, int]:
        from rasterio.enums import ColorInterp

        count = self._dataset.count
        if bands is not None:
            bad = [b for b in bands if not 1 <= b <= count]
            if bad:
                raise DataError(f"{self.path}: --bands {','.join(map(str, bands))} asks for band {bad[0]}, but the "
                                f"raster has {count} band{'s' if count != 1 else ''} (1..{count})")
            return bands
        colour = [b for b, interp in enumerate(self._dataset.colorinterp, start=1) if interp != ColorInterp.alpha]
        if len(colour) < 3:
            raise DataError(f"{self.path}: {len(colour)} non-alpha band(s); pass --bands (e.g. --bands 1,1,1 for a "
                            "single-band raster)")
        return tuple(colour[:3])

    def _choose_scaling(self, scaling: BandScaling | None) -> BandScaling:
        dtypes = {self._dataset.dtypes[b - 1] for b in self.bands}
        if scaling is None or scaling.kind == "none":
            if dtypes != {"uint8"}:
                raise ConfigError(f"{self.path}: bands {','.join(map(str, self.bands))} are {'/'.join(sorted(dtypes))}"
                                  "; pass --scale LOW,HIGH (a fixed range, e.g. 0,3000) or --scale pLOW,pHIGH "
                                  "(per-band percentiles, e.g. p2,p98) to map them to 0..255")
            return BandScaling("none")
        return scaling

    def _value_ranges(self) -> np.ndarray | None:
        """Per selected band ``(low, high)`` of the scaling, as ``float64 [3, 2]``; None without scaling."""
        scaling = self.scaling
        if scaling.kind == "none":
            return None
        if scaling.kind == "range":
            return np.array([[scaling.low, scaling.high]] * 3, dtype=np.float64)
        dataset = self._dataset
        factor = max(1.0, max(dataset.height, dataset.width) / _STATS_SIDE)
        shape = (max(1, round(dataset.height / factor)), max(1, round(dataset.width / factor)))
        ranges = np.zeros((3, 2), dtype=np.float64)
        for index, band in enumerate(self.bands):
            values = dataset.read(band, out_shape=shape, masked=True)
            valid = values.compressed().astype(np.float64)
            valid = valid[np.isfinite(valid)]
            if valid.size == 0:
                raise DataError(f"{self.path}: band {band} has no valid pixel to compute percentiles from")
            low, high = np.percentile(valid, [scaling.low, scaling.high])
            ranges[index] = (low, high if high > low else low + 1.0)
        return ranges

    @property
    def value_ranges(self) -> np.ndarray | None:
        """The ``(low, high)`` that map to 0 and 255 per selected band; None for ``uint8`` as it is."""
        return None if self._ranges is None else self._ranges.copy()

    @property
    def profile(self) -> dict:
        """The source's rasterio profile (driver, size, CRS, transform, ...)."""
        return dict(self._dataset.profile)

    def read(self, top: int, left: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """The window's model input and validity.

        Returns:
            ``(image, valid)``: ``uint8 [3, height, width]`` (invalid pixels hold whatever the
            file stores: callers replace them) and ``bool [height, width]``.

        Raises:
            DataError: If GDAL fails to read the window (a truncated or corrupt file).
        """
        from rasterio.errors import RasterioIOError
        from rasterio.windows import Window

        window = Window(left, top, width, height)
        try:
            data = self._dataset.read(list(self.bands), window=window)
            masks = self._dataset.read_masks(list(self.bands), window=window)
        except RasterioIOError as error:
            raise DataError(f"{self.path}: cannot read window rows {top}..{top + height}, columns "
                            f"{left}..{left + width} ({error})") from error
        self.window_reads.append((height, width))
        valid = np.any(masks != 0, axis=0)  # nodata where every selected band is (GDAL's dataset mask)
        if self._ranges is None:
            return data, valid
        if np.issubdtype(data.dtype, np.floating):
            valid &= np.all(np.isfinite(data), axis=0)  # NaN/inf are never image content
        low = self._ranges[:, 0].reshape(3, 1, 1)
        high = self._ranges[:, 1].reshape(3, 1, 1)
        scaled = np.nan_to_num((data.astype(np.float64) - low) * (255.0 / (high - low)), nan=0.0)
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8), valid

    def close(self) -> None:
        """Close the file."""
        self._dataset.close()

    def __enter__(self) -> RasterScene:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"RasterScene({str(self.path)!r}, {self.height}x{self.width}, bands={self.bands}, "
                f"scaling={self.scaling.describe()})")
