"""The full training recipe end to end: boundary head beside the model, composite loss, real runs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import SegformerForSemanticSegmentation

from conftest import crashed_copy, launch, tiny_run_config, write_config
from mapsage_ds.data.classes import LOVEDA_CLASSES
from mapsage_ds.losses import build_loss
from mapsage_ds.models.dinov3 import DINOv3Segmenter, dinov3_config
from mapsage_ds.models.heads import as_feature_map, build_boundary_head
from mapsage_ds.models.segformer import segformer_config
from mapsage_ds.tasks import SegmentationTask

FULL_LOSS = {"ce": 1.0, "dice": 0.5, "lovasz": 0.5, "boundary": 0.2, "ohem": {"thresh": 0.7, "min_kept": 200}}


def random_batch(size: int = 64, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, 7, (2, size, size), generator=gen)
    mask[:, :8] = 255
    return {"image": torch.randn(2, 3, size, size, generator=gen), "mask": mask}


def full_task(model: torch.nn.Module) -> SegmentationTask:
    loss = build_loss(ce=1.0, dice=0.5, lovasz=0.5, boundary=0.2, ohem_thresh=0.7, ohem_min_kept=200)
    return SegmentationTask(model, loss=loss, boundary_head=build_boundary_head(model))


def check_task(task: SegmentationTask) -> None:
    batch = random_batch()
    outputs = task(batch)
    assert set(outputs) == {"loss", "logits", "loss_ce", "loss_dice", "loss_lovasz", "loss_boundary"}
    assert outputs["logits"].shape == (2, 7, 64, 64)
    outputs["loss"].backward()
    head_grads = [p.grad for p in task.boundary_head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in head_grads)
    assert any(g.abs().sum() > 0 for g in head_grads)
    # Inference never touches the head, and the model holds none of its weights.
    task.eval()  # deterministic forwards (dropout, drop path) for the comparison
    with torch.no_grad():
        plain = task.model(pixel_values=batch["image"]).logits
        assert torch.equal(task.predict(batch["image"]),
                           torch.nn.functional.interpolate(plain, size=(64, 64), mode="bilinear",
                                                           align_corners=False))
    assert not any("boundary" in name for name in task.model.state_dict())


def test_boundary_head_trains_beside_segformer(tmp_path):
    model = SegformerForSemanticSegmentation(segformer_config("test", list(LOVEDA_CLASSES)))
    task = full_task(model)
    check_task(task)
    task.model.save_pretrained(tmp_path / "export")
    reloaded, info = SegformerForSemanticSegmentation.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_boundary_head_trains_beside_dinov3():
    model = DINOv3Segmenter(dinov3_config("test"), num_classes=len(LOVEDA_CLASSES))
    check_task(full_task(model))


def test_vit_token_sequences_become_patch_maps():
    grid = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4)  # (B, C, h, w)
    tokens = torch.cat([torch.full((1, 5, 2), -1.0), grid.flatten(2).transpose(1, 2)], dim=1)  # 5 prefix tokens
    assert torch.equal(as_feature_map(tokens, image_size=(48, 64), patch_size=16), grid)


@pytest.mark.slow
def test_full_recipe_two_processes_resumes_exactly_and_exports_the_plain_model(tmp_path, tiny_tree):
    sections = dict(
        data={"sampler": "class_aware", "augment": {
            "crop_sizes": [48, 64], "scale_range": [0.75, 1.5], "vflip": True, "rot90": True, "rotate_degrees": 15,
            "color_jitter": {"hue": 0.03}, "cutmix": 0.4, "mixup": 0.3}},
        model={"boundary_head": True}, loss=FULL_LOSS,
        train={"max_steps": 4, "save_every": 2, "eval_every": 2, "deepspeed": "zero3_fp32"},
    )
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    launch("finetune.py", ["--config", str(write_config(tmp_path / "full.yaml",
                                                        tiny_run_config(tiny_tree, full_dir, **sections)))], nproc=2)
    crashed_copy(full_dir, resumed_dir, step=2)
    launch("finetune.py", ["--config", str(write_config(tmp_path / "resumed.yaml",
                                                        tiny_run_config(tiny_tree, resumed_dir, **sections))),
                           "--resume"], nproc=2)

    records = [json.loads(line) for line in (full_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train and all({"loss_ce", "loss_dice", "loss_lovasz", "loss_boundary"} <= set(r) for r in train)
    for record in train:
        parts = 1.0 * record["loss_ce"] + 0.5 * record["loss_dice"] + 0.5 * record["loss_lovasz"]
        assert record["loss"] == pytest.approx(parts + 0.2 * record["loss_boundary"], rel=1e-5)

    full = load_file(full_dir / "export" / "model.safetensors")
    resumed = load_file(resumed_dir / "export" / "model.safetensors")
    assert not any("boundary" in key for key in full)
    mismatched = [k for k in full if not torch.equal(full[k], resumed[k])]
    assert full.keys() == resumed.keys() and not mismatched, f"weights differ after resume: {mismatched[:5]}"
    _, info = SegformerForSemanticSegmentation.from_pretrained(full_dir / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
