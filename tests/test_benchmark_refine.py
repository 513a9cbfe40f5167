"""scripts/benchmark_refine.py: its SAM architectures are the published ones, and it writes its section once."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import REPO
from mapsage_ds.data.loveda import LoveDA
from mapsage_ds.errors import ConfigError


def _script():
    spec = importlib.util.spec_from_file_location("script_benchmark_refine", REPO / "scripts" / "benchmark_refine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _regions_by_hand(mask: torch.Tensor, *, min_area: int) -> int:
    """Connected (8-neighbour) regions of each class with at least ``min_area`` pixels; no-data counts as class 0."""
    labels = np.where(mask.numpy() == 255, 0, mask.numpy())
    count = 0
    for label in np.unique(labels):
        components, _ = ndimage.label(labels == label, structure=np.ones((3, 3)))
        count += int((np.bincount(components.ravel())[1:] >= min_area).sum())
    return count


@pytest.mark.parametrize("size", ["vit_b", "vit_l", "vit_h"])
def test_published_sizes_are_what_load_sam_builds_from_metas_files(size):
    """The benchmark's random SAM has the config convert_meta_sam reads from Meta's own model of that size."""
    sam_model_registry = pytest.importorskip("segment_anything.build_sam").sam_model_registry
    from mapsage_ds.models.convert.sam import convert_meta_sam

    with torch.device("meta"):
        state = sam_model_registry[size]().state_dict()
    expected = convert_meta_sam(state, source=f"sam_{size}.pth").config
    built = _script().sam_config(size)
    for part in ("vision_config", "prompt_encoder_config", "mask_decoder_config"):
        assert getattr(built, part).to_dict() == getattr(expected, part).to_dict(), part


def test_writes_its_section_once_and_prompts_at_most_max_regions(tmp_path, tiny_tree):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nother sections stay\n\n<!-- inference-benchmark:start -->\nkept\n"
                   "<!-- inference-benchmark:end -->\n")
    script = _script()
    common = ["--sam-sizes", "test", "--model-size", "test", "--repeats", "1", "--threads", "1",
              "--machine", "test machine", "--doc", str(doc), "--sam-min-area", "16"]
    generated = script.main([*common, "--image-size", "64", "--sam-max-regions", "2"])
    assert generated[0]["regions_found"] > 2 and generated[0]["regions_prompted"] == 2
    real = script.main([*common, "--data-root", str(tiny_tree), "--index", "1", "--sam-max-regions", "32"])
    (record,) = real
    assert record["regions_found"] == _regions_by_hand(LoveDA(tiny_tree, "Val", scenes="urban")[1]["mask"],
                                                       min_area=16)
    assert record["regions_prompted"] == min(record["regions_found"], 32)
    assert record["coarse_s"] > 0 and record["refine_s"] > 0
    assert record["total_ratio"] == pytest.approx(record["total_s"] / record["coarse_s"])
    text = doc.read_text()
    assert text.count("<!-- refine-benchmark:start -->") == 1 and text.count("<!-- refine-benchmark:end -->") == 1
    assert "other sections stay" in text and "<!-- inference-benchmark:start -->\nkept\n" in text
    assert "Machine: test machine" in text and f"Val/urban tile 1 of {tiny_tree}" in text
    assert f"| test | 0.0 M | {record['regions_prompted']} |" in text


@pytest.mark.parametrize("argv, message", [
    (["--sam-sizes", "vit_x"], "vit_x"),
    (["--sam-sizes", ","], "at least one"),
    (["--repeats", "0"], "--repeats 0"),
])
def test_bad_arguments_fail_before_any_work(argv, message, tmp_path):
    doc = tmp_path / "benchmarks.md"
    with pytest.raises(ConfigError, match=message):
        _script().main([*argv, "--doc", str(doc)])
    assert not doc.exists()


def test_random_sam_weights_have_a_trained_networks_scale():
    """transformers' init (std 1e-10, zero LayerNorm gains) would time subnormal arithmetic, not SAM."""
    from transformers import SamModel

    script = _script()
    model = script.trained_like_weights_(SamModel(script.sam_config("test")))
    gains = [m.weight for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert gains and all(abs(float(g.detach().mean()) - 1.0) < 0.2 for g in gains)
    assert all(float(p.detach().std()) > 5e-3 for p in model.parameters() if p.numel() > 1)
