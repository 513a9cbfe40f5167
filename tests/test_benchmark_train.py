"""scripts/benchmark_train.py: three loops on one network, its section written once, the ratio line printed."""

from __future__ import annotations

import importlib.util
import sys

from conftest import REPO, TINY_SPEC
from mapsage_ds.data.synthetic import ensure_synthetic_tree


def _script():
    spec = importlib.util.spec_from_file_location("script_benchmark_train", REPO / "scripts" / "benchmark_train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_demo_preset_times_three_loops_and_writes_its_section_once(tmp_path, world_of_one, capsys):
    tree = ensure_synthetic_tree(tmp_path / "tree", TINY_SPEC)
    doc = tmp_path / "benchmarks.md"
    argv = ["--preset", "demo", "--data-root", str(tree), "--warmup", "1", "--rounds", "2", "--block", "1",
            "--set", "train.micro_batch_size=2", "--set", "data.crop_size=64", "--set", "model.size=test",
            "--set", "data.num_workers=0", "--doc", str(doc), "--machine", "test machine"]
    script = _script()
    figures = script.main(argv)
    assert set(figures["median_s"]) == {"toolkit", "bare", "ddp"} and all(v > 0 for v in figures["median_s"].values())
    assert figures["toolkit/bare"] == figures["median_s"]["toolkit"] / figures["median_s"]["bare"]
    assert figures["tflops"] > 0 and "resident" in figures["peak_memory"]
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == f"toolkit/bare = {figures['toolkit/bare']:.3f}"
    script.main(argv)  # a rerun replaces its section instead of adding a second one
    text = doc.read_text()
    assert text.count("### Training step, preset `demo`, 1 process(es) — test machine") == 1
    assert "| toolkit |" in text and "| ddp |" in text
