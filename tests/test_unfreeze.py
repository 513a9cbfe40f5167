"""Progressive unfreezing under real 2-process DeepSpeed: frozen layers never move, thawed ones start to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file

from conftest import crashed_copy, launch, tiny_run_config, write_config
from mapsage_ds.data.classes import LOVEDA_CLASSES
from mapsage_ds.data.loaders import TransformedDataset
from mapsage_ds.data.loveda import LoveDA
from mapsage_ds.data.transforms import EvalTransform
from mapsage_ds.evaluation.loop import run_evaluation
from mapsage_ds.models.factory import build_model, load_exported
from mapsage_ds.tasks import SegmentationTask

pytestmark = pytest.mark.slow

# Test preset: layer ids 0 (embeddings), 1..4 (blocks), 5 (final norm). Cut = round(f × 6):
# 0.75 -> 4 frozen ids (0..3), 0.25 -> 2 frozen ids (0..1); the boundary is at step 3.
PLAN = {"initial_frozen_fraction": 0.75, "stages": [{"at_step": 3, "frozen_fraction": 0.25}]}
ALWAYS_FROZEN, THAWED, ALWAYS_TRAINABLE = {0, 1}, {2, 3}, {4, 5}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor], object]:
    """A random test-size DINOv3 backbone saved as a local HF directory, and its weights in memory."""
    built = build_model(arch="dinov3", size="test", class_names=list(LOVEDA_CLASSES))
    # The name says satellite (SAT-493M), which decides the normalisation.
    path = tmp_path_factory.mktemp("dinov3") / "dinov3-test-pretrain-sat493m"
    built.module.backbone.save_pretrained(path)
    weights = {k: v.clone() for k, v in built.module.backbone.state_dict().items()}
    return path, weights, built.layer_id


def _run_config(tree, out, backbone, deepspeed, **train):
    return tiny_run_config(
        tree, out, model={"arch": "dinov3", "size": "test", "pretrained": str(backbone)},
        optim={"lr": 5e-3, "layer_decay": 0.9, "backbone_lr_mult": 1.0},
        train={"deepspeed": deepspeed, "max_steps": 5, "save_every": 1, "eval_every": 5, "keep_checkpoints": 10,
               **train},
    ) | {"unfreeze": PLAN}


def _backbone(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v.float() for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize("stage", [2, 3])
def test_frozen_layers_stay_bitwise_and_thawed_layers_start_moving(tmp_path, tiny_tree, pretrained, stage):
    backbone_dir, initial, layer_id = pretrained
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", _run_config(tiny_tree, out, backbone_dir, f"zero{stage}_bf16"))
    launch("finetune.py", ["--config", str(config)], nproc=2)

    before_boundary = _backbone(get_fp32_state_dict_from_zero_checkpoint(
        str(out / "checkpoints"), tag="step_00000003"), "model.backbone.")
    final = _backbone(load_exported(out / "export")[0].state_dict(), "backbone.")
    assert final.keys() == initial.keys()
    moved_before, moved_after = set(), set()
    for name, value in initial.items():
        layer = layer_id(f"backbone.{name}")
        start = value.to(torch.bfloat16).float()  # the run trains in bf16: frozen weights are held in bf16
        if not torch.equal(before_boundary[name], start):
            moved_before.add(layer)
        if not torch.equal(final[name], start):
            moved_after.add(layer)
    assert moved_after.isdisjoint(ALWAYS_FROZEN), "a frozen layer changed"
    assert moved_before.isdisjoint(ALWAYS_FROZEN | THAWED), "a layer changed before it was thawed"
    assert ALWAYS_TRAINABLE <= moved_before
    assert THAWED <= moved_after, "thawed layers did not start moving after the boundary"


def test_resume_mid_plan_restores_the_phase_and_reproduces_the_run(tmp_path, tiny_tree, pretrained):
    backbone_dir = pretrained[0]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    launch("finetune.py", ["--config", str(write_config(
        tmp_path / "full.yaml", _run_config(tiny_tree, full, backbone_dir, "zero2_fp32")))], nproc=2)
    # Continue from the step-4 checkpoint (after the boundary at 3).
    crashed_copy(full, resumed, step=4)
    launch("finetune.py", ["--resume", "--config", str(write_config(
        tmp_path / "resumed.yaml", _run_config(tiny_tree, resumed, backbone_dir, "zero2_fp32")))], nproc=2)
    for name in ("model.safetensors", "head.safetensors"):
        a, b = load_file(full / "export" / name), load_file(resumed / "export" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name

    # The export reloads outside DeepSpeed and reproduces the run's own final validation.
    model, normalize = load_exported(full / "export")
    data = TransformedDataset(LoveDA(tiny_tree, "Val"), EvalTransform(normalize), seed=0)
    metrics = run_evaluation(SegmentationTask(model.eval()), data, device=torch.device("cpu"), rank=0, world_size=1,
                             class_names=list(LOVEDA_CLASSES)).metrics
    reported = json.loads((full / "export" / "metrics.json").read_text())
    assert metrics.to_dict()["confusion"] == reported["confusion"]
