"""Streamed scene prediction: real GeoTIFFs written with rasterio, real exports, the in-memory slide as reference."""

from __future__ import annotations

from pathlib import Path

import fiona
import numpy as np
import pytest
import rasterio
import torch
from PIL import Image
from rasterio.crs import CRS
from rasterio.enums import ColorInterp
from rasterio.features import rasterize
from rasterio.transform import from_origin
from torch import nn

from conftest import clear_world, launch
from mapsage_ds.cli.predict import main as predict_main
from mapsage_ds.data.classes import LOVEDA_CLASSES, LOVEDA_PALETTE
from mapsage_ds.data.rasters import BandScaling, RasterScene, parse_bands, parse_scaling
from mapsage_ds.data.transforms import Normalize
from mapsage_ds.errors import ConfigError, DataError, MissingFileError
from mapsage_ds.evaluation.predictor import Predictor, window_starts
from mapsage_ds.evaluation.protocol import EvalProtocol
from mapsage_ds.evaluation.scenes import (
    blend_weights,
    find_inputs,
    nodata_fill,
    predict_scene,
    row_bands,
    write_polygons,
)
from mapsage_ds.models import load_exported
from mapsage_ds.models.export import write_hf_export
from mapsage_ds.models.segformer import build_segformer
from mapsage_ds.tasks import SegmentationTask

CRS_UTM50 = CRS.from_epsg(32650)
TRANSFORM = from_origin(400_000.0, 3_500_000.0, 0.3, 0.3)  # 0.3 m pixels
HEIGHT, WIDTH, TILE, STRIDE = 260, 300, 128, 96  # neither side a multiple of the tile or stride
SLIDE = ["--tile", str(TILE), "--stride", str(STRIDE), "--window-batch-size", "3"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """A test-size SegFormer with every weight perturbed (LayerNorms included), written as an export."""
    torch.manual_seed(0)
    model = build_segformer("test", list(LOVEDA_CLASSES))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return write_hf_export(model, state, tmp_path_factory.mktemp("export") / "export",
                           image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def reference(export_dir) -> Predictor:
    """The in-memory sliding-window predictor of the export (the evaluation protocol)."""
    model, normalize = load_exported(export_dir)
    task = SegmentationTask(model).eval()
    return Predictor(task.predict, normalize=normalize, protocol=EvalProtocol(
        mode="slide", tile=TILE, stride=STRIDE, window_batch_size=3))


def run_predict(argv: list[str], monkeypatch) -> int:
    """``mapsage-predict`` main(argv) in this process as a world of one."""
    clear_world(monkeypatch)
    try:
        return predict_main(argv)
    finally:
        clear_world(monkeypatch)


def write_raster(path: Path, data: np.ndarray, *, crs=CRS_UTM50, transform=TRANSFORM, nodata=None,
                 colorinterp=None) -> Path:
    """A tiled GeoTIFF of ``data`` [bands, H, W]."""
    profile = {"driver": "GTiff", "height": data.shape[1], "width": data.shape[2], "count": data.shape[0],
               "dtype": data.dtype.name, "tiled": True, "blockxsize": 64, "blockysize": 64}
    if crs is not None:
        profile.update(crs=crs, transform=transform)
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if colorinterp is not None:
            dst.colorinterp = colorinterp
    return path


def rgb_scene(seed: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """Smooth-ish random uint8 RGB content, values 1..255 (0 is the nodata value)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(1, 256, (3, height // 8 + 1, width // 8 + 1))
    image = np.kron(coarse, np.ones((1, 8, 8), dtype=np.int64))[:, :height, :width]
    noise = rng.integers(-20, 21, image.shape)
    return np.clip(image + noise, 1, 255).astype(np.uint8)


def in_memory_labels(predictor: Predictor, image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The reference: nodata filled with the model's mean colour, whole image slid in memory, nodata -> 255."""
    fill = nodata_fill(predictor)[:, None, None]
    filled = np.where(valid[None], image, fill).astype(np.uint8)
    labels = predictor.predict(torch.from_numpy(filled)[None])[0].numpy().astype(np.uint8)
    labels[~valid] = 255
    return labels


def read_labels(path: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as src:
        return src.read(1), {"crs": src.crs, "transform": src.transform, "shape": (src.height, src.width),
                             "nodata": src.nodata, "dtype": src.dtypes[0], "count": src.count,
                             "colormap": src.colormap(1), "tags": src.tags(), "blocks": src.block_shapes,
                             "compress": src.compression, "overviews": src.overviews(1)}


def test_streamed_mean_blend_is_the_in_memory_slide_and_keeps_the_georeference(tmp_path, export_dir, reference,
                                                                               monkeypatch):
    image = rgb_scene(1)
    image[:, 20:90, 30:110] = 0  # a nodata block (smaller than a window)
    write_raster(tmp_path / "scene.tif", image, nodata=0)
    out = tmp_path / "out"
    count = run_predict(["--model", str(export_dir), "--input", str(tmp_path / "scene.tif"), "--output-dir", str(out),
                         *SLIDE], monkeypatch)
    assert count == 1
    labels, meta = read_labels(out / "scene.tif")
    valid = np.ones((HEIGHT, WIDTH), dtype=bool)
    valid[20:90, 30:110] = False
    expected = in_memory_labels(reference, image, valid)
    assert len(window_starts(HEIGHT, TILE, STRIDE)) == 3 and len(window_starts(WIDTH, TILE, STRIDE)) == 3
    assert np.array_equal(labels, expected)
    assert (labels[20:90, 30:110] == 255).all() and labels[valid].max() <= 6
    assert len(np.unique(labels[valid])) > 1  # a model that says one class everywhere proves little
    assert meta["crs"] == CRS_UTM50 and meta["transform"] == TRANSFORM and meta["shape"] == (HEIGHT, WIDTH)
    assert meta["nodata"] == 255 and meta["dtype"] == "uint8" and meta["count"] == 1
    assert meta["compress"].name.lower() == "deflate" and meta["blocks"] == [(512, 512)]
    assert [meta["colormap"][i][:3] for i in range(7)] == list(LOVEDA_PALETTE)
    assert [meta["tags"][f"CLASS_{i}"] for i in range(7)] == list(LOVEDA_CLASSES)
    assert sorted(p.name for p in out.iterdir()) == ["scene.tif"]  # no temporary file left

    # Resumable: a re-run skips the finished scene (the file is not rewritten).
    stamp = (out / "scene.tif").stat().st_mtime_ns
    run_predict(["--model", str(export_dir), "--input", str(tmp_path / "scene.tif"), "--output-dir", str(out),
                 *SLIDE], monkeypatch)
    assert (out / "scene.tif").stat().st_mtime_ns == stamp


def test_reads_are_bounded_by_the_tile_and_empty_windows_are_skipped(tmp_path, reference):
    image = rgb_scene(2)
    alpha = np.full((1, HEIGHT, WIDTH), 255, dtype=np.uint8)
    alpha[0, 130:, :] = 0  # the lower half is transparent: its last row of windows holds nothing else
    rgba = np.concatenate([image[:3], alpha])
    path = write_raster(tmp_path / "rgba.tif", rgba, colorinterp=[ColorInterp.red, ColorInterp.green,
                                                                 ColorInterp.blue, ColorInterp.alpha])
    with RasterScene(path) as scene:
        assert scene.bands == (1, 2, 3)  # the alpha band is a mask, not a colour
        result = predict_scene(reference, scene, tmp_path / "out.tif", tile=TILE, stride=STRIDE, window_batch_size=3,
                               device=torch.device("cpu"), progress=False)
        reads = list(scene.window_reads)
    assert result.windows == 9 and len(reads) == 9
    assert max(h * w for h, w in reads) == TILE * TILE < HEIGHT * WIDTH
    assert result.windows_predicted == 6  # the windows starting at row 132 lie wholly in the transparent part
    labels, _ = read_labels(tmp_path / "out.tif")
    valid = alpha[0] > 0
    assert (labels[~valid] == 255).all()
    # Valid pixels are untouched by the skipped windows, but the batches differ: compare within float noise.
    expected = in_memory_labels(reference, image[:3], valid)
    assert (labels == expected).mean() > 0.999


class _Pointwise(nn.Module):
    """A 1x1-convolution segmenter: each pixel's logits depend on that pixel only, so windows agree exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 7, 1)
        torch.manual_seed(3)
        nn.init.normal_(self.conv.weight)
        nn.init.normal_(self.conv.bias)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("blend", ["mean", "gaussian", "cosine"])
def test_every_blend_of_agreeing_windows_is_seam_free(tmp_path, blend):
    net = _Pointwise().eval()
    predictor = Predictor(net, normalize=Normalize(), protocol=EvalProtocol(mode="slide", tile=64, stride=40))
    image = rgb_scene(4, 150, 170)
    image[:, :, :60] = 77  # a constant part: a constant map, no seam at window borders
    write_raster(tmp_path / "s.tif", image)
    with RasterScene(tmp_path / "s.tif") as scene:
        predict_scene(predictor, scene, tmp_path / "o.tif", tile=64, stride=40, window_batch_size=4, blend=blend,
                      probabilities=True, device=torch.device("cpu"), progress=False)
    labels, _ = read_labels(tmp_path / "o.tif")
    whole = predictor.logits(torch.from_numpy(image)[None])[0]
    assert np.array_equal(labels, whole.argmax(0).numpy())
    assert len(np.unique(labels[:, :60])) == 1
    with rasterio.open(tmp_path / "o_probabilities.tif") as src:
        probs = src.read()
        assert src.count == 7 and src.crs == CRS_UTM50
    expected = (whole.softmax(0) * 255).round().numpy()
    assert np.abs(probs.astype(np.float64) - expected).max() <= 1


def test_gaussian_blend_equals_a_direct_weighted_average(tmp_path, reference):
    image = rgb_scene(5, 200, 230)
    write_raster(tmp_path / "g.tif", image)
    with RasterScene(tmp_path / "g.tif") as scene:
        predict_scene(reference, scene, tmp_path / "o.tif", tile=TILE, stride=STRIDE, window_batch_size=2,
                      blend="gaussian", device=torch.device("cpu"), progress=False)
    labels, _ = read_labels(tmp_path / "o.tif")
    # Independent reference: every window alone, weighted by exp(-d²/2σ²), σ = tile/4, peak 1, floor 1e-3.
    centre = np.arange(TILE) + 0.5 - TILE / 2
    bump = np.exp(-0.5 * (centre / (TILE / 4)) ** 2)
    weight = np.maximum(np.outer(bump, bump) / bump.max() ** 2, 1e-3)
    total, norm = np.zeros((7, 200, 230)), np.zeros((200, 230))
    x = torch.from_numpy(image)[None]
    for top in window_starts(200, TILE, STRIDE):
        for left in window_starts(230, TILE, STRIDE):
            window = x[..., top:top + TILE, left:left + TILE]
            with torch.no_grad():
                logits = reference.forward(_normalised(reference, window))[0].double().numpy()
            total[:, top:top + TILE, left:left + TILE] += logits * weight
            norm[top:top + TILE, left:left + TILE] += weight
    expected = (total / norm).argmax(0)
    assert (labels == expected).mean() > 0.999


def _normalised(predictor: Predictor, window: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(predictor.normalize.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(predictor.normalize.std).view(1, 3, 1, 1) * 255
    return (window.float() - mean) / std


def test_sixteen_bit_bands_are_selected_and_scaled_before_the_models_normalisation(tmp_path, export_dir, reference,
                                                                                    monkeypatch):
    rng = np.random.default_rng(6)
    data = (rgb_scene(6).astype(np.uint16) * 15)  # three bands of 0..3825
    nir = rng.integers(0, 4000, (1, HEIGHT, WIDTH)).astype(np.uint16)
    bgrn = np.concatenate([data[::-1], nir])  # stored as B, G, R, NIR
    path = write_raster(tmp_path / "s2.tif", bgrn)
    run_predict(["--model", str(export_dir), "--input", str(path), "--bands", "3,2,1", "--scale", "0,4000",
                 "--output-dir", str(tmp_path / "out"), *SLIDE], monkeypatch)
    labels, _ = read_labels(tmp_path / "out" / "s2.tif")
    rgb = np.clip(np.rint(bgrn[[2, 1, 0]].astype(np.float64) * 255 / 4000), 0, 255).astype(np.uint8)
    assert np.array_equal(labels, in_memory_labels(reference, rgb, np.ones((HEIGHT, WIDTH), bool)))
    with RasterScene(path, bands=(4, 1, 2), scaling=parse_scaling("p2,p98")) as scene:
        expected = [np.percentile(bgrn[b - 1].astype(np.float64), [2, 98]) for b in (4, 1, 2)]
        assert np.allclose(scene.value_ranges, expected)
        image, valid = scene.read(10, 20, 30, 40)
        assert image.dtype == np.uint8 and image.shape == (3, 30, 40) and valid.all()
    with pytest.raises(ConfigError, match=r"s2\.tif.*uint16.*--scale"):
        RasterScene(path)


def test_folder_and_glob_inputs_with_plain_images(tmp_path, export_dir, monkeypatch):
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    write_raster(scenes / "a.tif", rgb_scene(7, 90, 100))
    write_raster(scenes / "b.tiff", rgb_scene(8, 70, 140), crs=CRS.from_epsg(4326),
                 transform=from_origin(116.0, 40.0, 1e-5, 1e-5))
    Image.fromarray(rgb_scene(9, 64, 64).transpose(1, 2, 0)).save(scenes / "c.png")
    (scenes / "notes.txt").write_text("not an image")
    assert [p.name for p in find_inputs(scenes)] == ["a.tif", "b.tiff", "c.png"]
    out = tmp_path / "out"
    run_predict(["--model", str(export_dir), "--input", str(scenes), "--output-dir", str(out), "--outputs", "labels",
                 *SLIDE], monkeypatch)
    assert sorted(p.name for p in out.iterdir()) == ["a.tif", "b.tif", "labels"]
    assert [p.name for p in (out / "labels").iterdir()] == ["c.png"]
    with rasterio.open(out / "b.tif") as src:
        assert src.crs == CRS.from_epsg(4326) and src.shape == (70, 140)
    glob_out = tmp_path / "glob"
    run_predict(["--model", str(export_dir), "--input", str(scenes / "*.tif"), "--output-dir", str(glob_out),
                 *SLIDE], monkeypatch)
    assert [p.name for p in glob_out.iterdir()] == ["a.tif"]
    assert np.array_equal(read_labels(glob_out / "a.tif")[0], read_labels(out / "a.tif")[0])


def test_a_raster_without_crs_is_written_without_georeference(tmp_path, reference):
    write_raster(tmp_path / "plain.tif", rgb_scene(10, 80, 90), crs=None)
    with RasterScene(tmp_path / "plain.tif") as scene, pytest.warns(UserWarning, match="no CRS"):
        predict_scene(reference, scene, tmp_path / "o.tif", tile=TILE, stride=STRIDE, window_batch_size=2,
                      device=torch.device("cpu"), progress=False)
    with rasterio.open(tmp_path / "o.tif") as src:
        assert src.crs is None and src.shape == (80, 90)


def test_bad_input_fails_with_the_file_or_value_and_writes_nothing(tmp_path, export_dir, monkeypatch):
    (tmp_path / "in").mkdir()
    good = write_raster(tmp_path / "in" / "good.tif", rgb_scene(11, 64, 64))
    (tmp_path / "in" / "broken.tif").write_bytes(b"II*\x00 this is not a TIFF")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"broken\.tif"):
        run_predict(["--model", str(export_dir), "--input", str(tmp_path / "in"), "--output-dir", str(out)],
                    monkeypatch)
    assert not out.exists() or not list(out.iterdir())
    with pytest.raises(MissingFileError, match=r"missing\.tif"):
        run_predict(["--model", str(export_dir), "--input", str(tmp_path / "missing.tif"), "--output-dir", str(out)],
                    monkeypatch)
    with pytest.raises(DataError, match=r"good\.tif.*band 5.*3 bands"):
        RasterScene(good, bands=(5, 2, 1))
    with pytest.raises(ConfigError, match="--bands '3,2'"):
        parse_bands("3,2")
    with pytest.raises(ConfigError, match="--scale 'p2,q9'"):
        parse_scaling("p2,q9")
    with pytest.raises(ConfigError, match="LOW < HIGH"):
        BandScaling("range", 10, 5)
    with pytest.raises(ConfigError, match="--blend 'box'"):
        blend_weights("box", 8, 8)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"--output-dir .*a_file.*not writable"):
        run_predict(["--model", str(export_dir), "--input", str(good), "--output-dir", str(blocker / "sub")],
                    monkeypatch)
    with pytest.raises(ConfigError, match=r"--bands and --scale apply to rasters; .*c\.png"):
        Image.fromarray(rgb_scene(12, 32, 32).transpose(1, 2, 0)).save(tmp_path / "c.png")
        run_predict(["--model", str(export_dir), "--input", str(tmp_path / "c.png"), "--bands", "1,2,3",
                     "--output-dir", str(out)], monkeypatch)



def nodata_scene(seed: int, height: int = HEIGHT, width: int = WIDTH) -> tuple[np.ndarray, np.ndarray]:
    """RGB content with a nodata block (value 0) that empties whole windows of the tile/stride below."""
    image = rgb_scene(seed, height, width)
    image[:, :224, 172:] = 0  # the windows at (0, 172) and (96, 172) hold nothing else: dropped from their batches
    valid = np.ones((height, width), dtype=bool)
    valid[:224, 172:] = False
    return image, valid


def read_bands(path: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as src:
        return src.read(), {"crs": src.crs, "transform": src.transform, "tags": src.tags(), "nodata": src.nodata}


def test_row_bands_cover_every_row_once():
    assert row_bands(HEIGHT, TILE, STRIDE, 1) == [(0, HEIGHT)]
    assert window_starts(HEIGHT, TILE, STRIDE) == [0, 96, 132]
    assert row_bands(HEIGHT, TILE, STRIDE, 2) == [(0, 96), (96, HEIGHT)]
    assert row_bands(HEIGHT, TILE, STRIDE, 3) == [(0, 96), (96, 132), (132, HEIGHT)]
    assert row_bands(HEIGHT, TILE, STRIDE, 4) == [(0, 0), (0, 96), (96, 132), (132, HEIGHT)]  # one rank idles
    assert row_bands(100, TILE, STRIDE, 2) == [(0, 0), (0, 100)]  # one window row


@pytest.mark.parametrize("blend", ["mean", "gaussian"])
def test_a_scene_shared_by_windows_equals_one_process_bit_for_bit(tmp_path, reference, one_process_world, blend):
    """Ranks 1, 2 then 0 of a 3-rank share, run in turn in this process (a world of one makes the barrier pass)."""
    image, _ = nodata_scene(13)
    write_raster(tmp_path / "s.tif", image, nodata=0)
    settings = dict(tile=TILE, stride=STRIDE, window_batch_size=2, blend=blend, device=torch.device("cpu"),
                    probabilities=True, progress=False)  # batches of 2 windows straddle the rows of 3 windows
    (tmp_path / "one").mkdir()
    (tmp_path / "three").mkdir()
    with RasterScene(tmp_path / "s.tif") as scene:
        whole = predict_scene(reference, scene, tmp_path / "one" / "s.tif", **settings)
        shares = [predict_scene(reference, scene, tmp_path / "three" / "s.tif", rank=rank, world_size=3, **settings)
                  for rank in (1, 2, 0)]
    assert whole.windows_predicted == 7  # 9 windows, 2 of them nodata only
    # Windows 0..8 row-major, 2 and 5 nodata only, batches [0,1] [2,3] [4,5] [6,7] [8]. Rank 1 (rows 96..132) needs
    # window rows 0-1 (windows 0..5), rank 2 (rows 132..260) rows 1-2 (3..8, batches from 2), rank 0 row 0 (0..3).
    assert [s.windows_predicted for s in shares] == [4, 5, 3]
    assert sorted(p.name for p in (tmp_path / "three").iterdir()) == ["s.tif", "s_probabilities.tif"]
    for name in ("s.tif", "s_probabilities.tif"):
        one, one_meta = read_bands(tmp_path / "one" / name)
        three, three_meta = read_bands(tmp_path / "three" / name)
        assert np.array_equal(one, three), name
        assert one_meta == three_meta and three_meta["crs"] == CRS_UTM50 and three_meta["transform"] == TRANSFORM
    assert (read_bands(tmp_path / "one" / "s.tif")[0][0, :224, 172:] == 255).all()


def test_two_processes_share_one_scene_and_write_the_one_process_files(tmp_path, export_dir, reference, monkeypatch):
    image, valid = nodata_scene(14)
    write_raster(tmp_path / "scene.tif", image, nodata=0)
    common = ["--model", str(export_dir), "--input", str(tmp_path / "scene.tif"), "--probabilities", *SLIDE]
    run_predict([*common, "--output-dir", str(tmp_path / "one")], monkeypatch)
    output = launch("predict.py", [*common, "--output-dir", str(tmp_path / "two"), "--polygons"], nproc=2)
    assert "1 images/scenes predicted" in output
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["scene.gpkg", "scene.tif",
                                                                      "scene_probabilities.tif"]
    for name in ("scene.tif", "scene_probabilities.tif"):
        one, one_meta = read_bands(tmp_path / "one" / name)
        two, two_meta = read_bands(tmp_path / "two" / name)
        assert np.array_equal(one, two), name
        assert one_meta == two_meta and two_meta["crs"] == CRS_UTM50 and two_meta["transform"] == TRANSFORM
    # The in-memory slide is the reference of the one-process file (where no window was dropped, bit for bit).
    labels = read_labels(tmp_path / "two" / "scene.tif")[0]
    assert (labels == in_memory_labels(reference, image, valid)).mean() > 0.999
    assert np.array_equal(polygon_raster(tmp_path / "two" / "scene.gpkg", labels.shape, TRANSFORM), labels)


def polygon_raster(gpkg: Path, shape: tuple[int, int], transform) -> np.ndarray:
    """The GeoPackage's polygons burnt back into a raster by ``class_id``, 255 where none lies."""
    with fiona.open(gpkg) as src:
        shapes = [(feature.geometry, feature.properties["class_id"]) for feature in src]
    return rasterize(shapes, out_shape=shape, transform=transform, fill=255, dtype="uint8")


def test_polygons_burn_back_into_the_class_map_with_its_crs(tmp_path, one_process_world):
    net = _Pointwise().eval()
    predictor = Predictor(net, normalize=Normalize(), protocol=EvalProtocol(mode="slide", tile=128, stride=128))
    image, valid = nodata_scene(15, 200, 700)  # two 512-px blocks across: regions are cut at the block edge
    write_raster(tmp_path / "s.tif", image, nodata=0)
    (tmp_path / "out").mkdir()
    with RasterScene(tmp_path / "s.tif") as scene:
        result = predict_scene(predictor, scene, tmp_path / "out" / "s.tif", tile=128, stride=128,
                               window_batch_size=8, polygons=True, device=torch.device("cpu"), progress=False)
    assert result.polygons == tmp_path / "out" / "s.gpkg"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["s.gpkg", "s.tif"]
    labels, meta = read_labels(tmp_path / "out" / "s.tif")
    assert len(np.unique(labels[valid])) > 2 and (labels[~valid] == 255).all()
    with fiona.open(tmp_path / "out" / "s.gpkg") as src:
        assert CRS.from_wkt(src.crs_wkt) == CRS_UTM50 and src.schema["geometry"] == "Polygon"
        assert dict(src.schema["properties"]) == {"class_id": "int", "class_name": "str"}
        names = {(f.properties["class_id"], f.properties["class_name"]) for f in src}
    assert names == {(int(c), LOVEDA_CLASSES[c]) for c in np.unique(labels[valid])}
    assert np.array_equal(polygon_raster(tmp_path / "out" / "s.gpkg", labels.shape, meta["transform"]), labels)

    # A class map whose polygons are missing gets them on a re-run (the scene is not predicted again).
    (tmp_path / "out" / "s.gpkg").unlink()
    write_polygons(tmp_path / "out" / "s.tif", tmp_path / "again.gpkg")
    with fiona.open(tmp_path / "again.gpkg") as src:
        assert len(src) > 0
    with pytest.raises(DataError, match=r"s\.tif: class index 6 has no name"):
        write_polygons(tmp_path / "out" / "s.tif", tmp_path / "bad.gpkg", class_names=LOVEDA_CLASSES[:6])
    assert not (tmp_path / "bad.gpkg").exists() and not list(tmp_path.glob(".bad*"))
