"""scripts/evaluate.py, predict.py and leaderboard.py: real processes, real files, real checkpoints."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tiny_sam import save_tiny_sam

from conftest import REPO, clear_world, launch, tiny_run_config, write_config
from mapsage_ds.data import write_loveda_sample
from mapsage_ds.data.loveda import LoveDA
from mapsage_ds.errors import ConfigError
from mapsage_ds.evaluation.predictor import Predictor
from mapsage_ds.evaluation.protocol import EvalProtocol
from mapsage_ds.models import load_exported
from mapsage_ds.runtime.checkpoint import read_fp32_state
from mapsage_ds.tasks import SegmentationTask

pytestmark = pytest.mark.slow

SLIDE_TTA = ["--mode", "slide", "--tile", "48", "--stride", "32", "--tta-scales", "0.75,1.0", "--tta-flip",
             "--window-batch-size", "3"]


def run_main(script: str, argv: list[str], monkeypatch):
    """``scripts/{script}`` main(argv) in this process, as a world of one, leaving the environment as it was."""
    clear_world(monkeypatch)
    spec = importlib.util.spec_from_file_location(f"script_{Path(script).stem}", REPO / "scripts" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.main(argv)
    finally:
        clear_world(monkeypatch)


@pytest.fixture(scope="module")
def uneven_tree(tmp_path_factory) -> Path:
    """Val/Urban with three images of different sizes: two ranks get different window counts."""
    root = tmp_path_factory.mktemp("uneven")
    rng = np.random.default_rng(0)
    for index, (height, width) in enumerate([(96, 96), (64, 80), (80, 112)]):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        raw = np.kron(rng.integers(0, 8, (height // 16, width // 16)), np.ones((16, 16), dtype=np.int64))
        write_loveda_sample(root, "Val", "Urban", f"{index}.png", image, raw.astype(np.uint8))
    return root


def test_slide_tta_evaluation_is_identical_on_one_and_two_processes(tmp_path, uneven_tree, export_dir, monkeypatch):
    common = ["--model", str(export_dir), "--data-root", str(uneven_tree), "--scenes", "urban", *SLIDE_TTA]
    run_main("evaluate.py", [*common, "--output-dir", str(tmp_path / "one")], monkeypatch)
    launch("evaluate.py", [*common, "--output-dir", str(tmp_path / "two")], nproc=2, launcher="torchrun")
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert sum(map(sum, one["confusion"])) > 0
    for key in ("confusion", "iou", "miou", "boundary_iou", "mean_boundary_iou", "overall_accuracy"):
        assert one[key] == two[key], key
    assert two["world_size"] == 2 and len(set(two["forwards_per_rank"])) == 1
    assert two["protocol"] == {"mode": "slide", "tile": 48, "stride": 32, "tta_scales": [0.75, 1.0], "tta_flip": ["h"],
                               "window_batch_size": 3, "batch_size": 1, "max_images": None, "boundary_width": None,
                               "boundary_dilation_ratio": 0.02, "ensemble": [], "refine": None}
    for name in ("metrics.md", "confusion_matrix.png", "iou_per_class.png"):
        assert (tmp_path / "two" / name).is_file()
    assert len(list((tmp_path / "two" / "panels").glob("*.png"))) == 3


# ZeRO-0 in bf16 keeps its fp32 masters as unnamed optimizer groups, not in DeepSpeed's ZeRO files.
@pytest.mark.parametrize("deepspeed", ["zero2_fp32", "zero0_bf16"])
def test_checkpoint_evaluation_equals_the_export_and_the_run_validation(tmp_path, tiny_tree, monkeypatch, deepspeed):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_run_config(
        tiny_tree, run, train={"max_steps": 1, "eval_every": 1, "save_every": 1, "deepspeed": deepspeed},
        optim={"warmup_steps": 0}, eval={"max_images": 2}))
    run_main("finetune.py", ["--config", str(config)], monkeypatch)
    data = ["--data-root", str(tiny_tree), "--max-images", "2"]
    from_checkpoint = run_main("evaluate.py", ["--checkpoint", str(run / "checkpoints"), "--config",
                                               str(run / "config.yaml"), *data], monkeypatch)
    from_export = run_main("evaluate.py", ["--model", str(run / "export"), *data], monkeypatch)
    assert from_checkpoint.confusion == from_export.confusion
    assert from_checkpoint.boundary_iou == from_export.boundary_iou
    # Both hold the optimizer's fp32 masters, bit for bit (not bf16 weights cast up).
    saved = read_fp32_state(run / "checkpoints" / "step_00000001")
    exported = load_exported(run / "export")[0].state_dict()
    assert {f"model.{k}" for k in exported} <= set(saved)
    assert all(torch.equal(saved[f"model.{k}"], v) for k, v in exported.items())
    if deepspeed.endswith("fp32"):  # the training run validated with the same predictor: same numbers
        validated = json.loads((run / "export" / "metrics.json").read_text())
        assert validated["confusion"] == from_export.confusion
    report = json.loads((run / "eval_Val" / "metrics.json").read_text())
    assert report["models"][0]["source"] == "deepspeed_checkpoint"


def test_ensemble_of_one_model_with_itself_is_that_model(tmp_path, tiny_tree, export_dir, monkeypatch):
    data = ["--data-root", str(tiny_tree), "--scenes", "rural", "--mode", "slide", "--tile", "64", "--stride", "48"]
    single = run_main("evaluate.py", ["--model", str(export_dir), *data, "--output-dir", str(tmp_path / "s")],
                      monkeypatch)
    ensemble = run_main("evaluate.py", ["--ensemble", f"{export_dir}:0.7,{export_dir}:0.3", *data,
                                        "--output-dir", str(tmp_path / "e")], monkeypatch)
    assert ensemble.confusion == single.confusion
    report = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert [m["weight"] for m in report["models"]] == [0.7, 0.3]
    board = run_main("leaderboard.py", [str(tmp_path / "s"), str(tmp_path / "e"), "--output",
                                        str(tmp_path / "board.md")], monkeypatch)
    assert board == (tmp_path / "board.md").read_text() and "ensemble(" in board
    # --ensemble is a shorthand for the eval section: the same ensemble from a config file scores the same.
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({"eval": {"ensemble": [
        {"path": str(export_dir), "weight": 0.7}, {"path": str(export_dir), "weight": 0.3}]}}))
    from_config = run_main("evaluate.py", ["--config", str(tmp_path / "eval.yaml"), *data,
                                           "--output-dir", str(tmp_path / "c")], monkeypatch)
    assert from_config.confusion == ensemble.confusion
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["protocol"]["ensemble"] == [
        {"path": str(export_dir), "weight": 0.7}, {"path": str(export_dir), "weight": 0.3}]


def test_sam_refinement_reports_before_and_after(tmp_path, tiny_tree, export_dir, monkeypatch):
    sam = save_tiny_sam(tmp_path / "sam")
    run_main("evaluate.py", ["--model", str(export_dir), "--data-root", str(tiny_tree), "--scenes", "urban",
                             "--max-images", "1", "--refine", "sam", "--sam-model", str(sam), "--sam-min-area", "16",
                             "--output-dir", str(tmp_path / "r")], monkeypatch)
    report = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert report["refinement"]["method"] == "sam" and report["refinement"]["model"] == str(sam)
    before = report["before_refinement"]
    assert sum(map(sum, before["confusion"])) == sum(map(sum, report["confusion"]))
    assert "before refinement" in (tmp_path / "r" / "metrics.md").read_text()


def test_predict_writes_benchmark_pngs_colours_and_overlays(tmp_path, tiny_tree, export_dir, monkeypatch, capsys):
    out = tmp_path / "pred"
    count = run_main("predict.py", ["--model", str(export_dir), "--data-root", str(tiny_tree), "--split", "Test",
                                    "--output-dir", str(out)], monkeypatch)
    test_split = LoveDA(tiny_tree, "Test")
    assert count == len(test_split)
    model, normalize = load_exported(export_dir)
    task = SegmentationTask(model).eval()
    predictor = Predictor(task.predict, normalize=normalize, protocol=EvalProtocol())
    for sample in test_split:
        file_name = Path(sample["name"]).name
        with Image.open(out / "labels" / file_name) as label_png:
            assert label_png.mode == "L"
            labels = np.array(label_png)
        expected = predictor.predict(sample["image"][None])[0].numpy()
        assert labels.dtype == np.uint8 and labels.shape == expected.shape and labels.max() <= 6
        assert np.array_equal(labels, expected)
        for kind in ("color", "overlay"):
            with Image.open(out / kind / file_name) as image:
                assert image.mode == "RGB" and image.size == (labels.shape[1], labels.shape[0])
    assert "predict (rank 0)" in capsys.readouterr().err  # the progress bar

    folder = tmp_path / "folder"
    folder.mkdir()
    first = test_split.samples[0].image
    (folder / first.name).write_bytes(first.read_bytes())
    run_main("predict.py", ["--model", str(export_dir), "--images", str(folder), "--outputs", "labels",
                            "--output-dir", str(tmp_path / "pred2")], monkeypatch)
    assert [p.name for p in (tmp_path / "pred2").iterdir()] == ["labels"]
    assert (tmp_path / "pred2" / "labels" / first.name).read_bytes() == (out / "labels" / first.name).read_bytes()


@pytest.mark.parametrize(("argv", "message"), [
    (["--checkpoint", "x"], "needs --config"),
    (["--ensemble", "a:1,b:2"], "needs --output-dir"),
    (["--model", "x", "--refine", "sam"], "needs --sam-model"),
    (["--model", "x", "--tile", "32", "--stride", "64", "--mode", "slide"], "stride"),
    (["--ensemble", "a:0"], "weight must be > 0"),
    ([], "exactly one model source"),
    (["--model", "x", "--set", "eval.ensemble=[{path: a, weight: 1}]"], "exactly one model source"),
    (["--model", "x", "--set", "eval.refine={model: sam.pth, confidence: 0.2}"], "eval.refine"),
])
def test_bad_arguments_fail_before_any_work(argv, message, monkeypatch):
    with pytest.raises(ConfigError, match=message):
        run_main("evaluate.py", [*argv, "--data-root", "nowhere"], monkeypatch)


def test_benchmark_script_writes_its_section_once(tmp_path, monkeypatch):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nother sections stay\n")
    argv = ["--model-size", "test", "--image-size", "80", "--settings", "48/32,32/16", "--repeats", "1",
            "--threads", "1", "--machine", "test machine", "--doc", str(doc)]
    records = run_main("benchmark_inference.py", argv, monkeypatch)
    run_main("benchmark_inference.py", argv, monkeypatch)
    assert [(r["tile"], r["windows"]) for r in records] == [(48, 4), (32, 16)]
    assert all(r["max_abs_diff"] <= 1e-5 for r in records)
    text = doc.read_text()
    assert text.count("<!-- inference-benchmark:start -->") == 1 and "other sections stay" in text
    assert "Machine: test machine" in text and "| 1 | 32 / 16 | 16 |" in text
