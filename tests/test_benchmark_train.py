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
            "--set", "data.num_workers=0", "--doc", str(doc), "--machine", "test machine",
            "--variants", "channels_last,eager_attention"]
    script = _script()
    figures = script.main(argv)
    assert set(figures["median_s"]) == {"toolkit", "bare", "ddp", "toolkit+channels_last", "toolkit+eager_attention"}
    assert all(v > 0 for v in figures["median_s"].values())
    assert figures["variants"] == {v: figures["median_s"][f"toolkit+{v}"] / figures["median_s"]["toolkit"]
                                   for v in ("channels_last", "eager_attention")}
    assert figures["toolkit/bare"] == figures["median_s"]["toolkit"] / figures["median_s"]["bare"]
    assert figures["tflops"] > 0 and "resident" in figures["peak_memory"]
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == f"toolkit/bare = {figures['toolkit/bare']:.3f}"
    script.main(argv)  # a rerun replaces its section instead of adding a second one
    text = doc.read_text()
    heading = "### Training step, preset `demo`, 1 process(es), variants of the toolkit step — test machine"
    assert text.count(heading) == 1
    assert "<!-- train-benchmark-demo-1-variants:start -->" in text
    assert "| toolkit |" in text and "| ddp |" in text and "| toolkit+channels_last |" in text
    assert "| eager_attention: transformers' eager attention instead of fused SDPA |" in text


def test_the_variants_change_what_they_say(world_of_one):
    """channels_last puts the images, and so the activations, in that format; eager_attention switches every
    attention; neither changes the loss beyond float rounding."""
    import torch

    from mapsage_ds.builders import build_task_loss
    from mapsage_ds.config import LossConfig
    from mapsage_ds.data.classes import IGNORE_INDEX, LOVEDA_CLASSES
    from mapsage_ds.models.segformer import build_segformer
    from mapsage_ds.tasks import SegmentationTask

    script = _script()
    torch.manual_seed(0)
    task = SegmentationTask(build_segformer("test", list(LOVEDA_CLASSES)), ignore_index=IGNORE_INDEX,
                            loss=build_task_loss(LossConfig(), num_classes=len(LOVEDA_CLASSES))).eval()
    batch = {"image": torch.randn(2, 3, 64, 64), "mask": torch.randint(0, 7, (2, 64, 64))}
    reference = task(dict(batch))["loss"]
    script.apply_variant(task, "channels_last")
    seen = {}
    task.register_forward_hook(lambda module, args, output: seen.update(image=args[0]["image"]))
    first_conv = next(m for m in task.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda module, args, output: seen.update(activation=output))
    assert torch.allclose(task(dict(batch))["loss"], reference, rtol=1e-5)
    assert seen["image"].is_contiguous(memory_format=torch.channels_last)
    assert seen["activation"].is_contiguous(memory_format=torch.channels_last)
    assert not seen["activation"].is_contiguous()
    script.apply_variant(task, "eager_attention")
    assert {m.config._attn_implementation for m in task.modules() if hasattr(m, "config")} == {"eager"}
    assert torch.allclose(task(dict(batch))["loss"], reference, rtol=1e-5)
