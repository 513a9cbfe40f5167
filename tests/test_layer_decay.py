"""Layer ids, layer-wise learning-rate scales and the freezing cut, checked against the formulas."""

from __future__ import annotations

import pytest
import torch

from mapsage_ds.models.factory import build_model
from mapsage_ds.optim import LRSchedule, build_param_groups
from mapsage_ds.optim.param_groups import layer_decay_scale
from mapsage_ds.optim.unfreeze import UnfreezePlan, frozen_layer_count, set_frozen
from mapsage_ds.tasks import SegmentationTask

CLASSES = [f"c{i}" for i in range(7)]


def _expected_dinov3_id(name: str, layers: int) -> int | None:
    if name.startswith("head."):
        return None
    if name.startswith("backbone.embeddings."):
        return 0
    parts = name.split(".")
    if parts[1:3] == ["model", "layer"]:
        return int(parts[3]) + 1
    return layers + 1


def test_dinov3_layer_ids_follow_block_order():
    built = build_model(arch="dinov3", size="test", class_names=CLASSES)
    assert built.num_layers == 4
    for name, _ in built.module.named_parameters():
        assert built.layer_id(name) == _expected_dinov3_id(name, 4), name


def test_segformer_layer_ids_are_cumulative_block_indices():
    built = build_model(arch="segformer", size="mini", class_names=CLASSES)  # depths [1, 1, 2, 1]
    depths = [1, 1, 2, 1]
    for name, _ in built.module.named_parameters():
        layer = built.layer_id(name)
        if name.startswith("decode_head."):
            assert layer is None
            continue
        stage = int(name.split(".")[2])
        first_block = sum(depths[:stage]) + 1
        if ".blocks." in name:
            assert layer == first_block + int(name.split(".")[4])
        elif ".patch_embeddings." in name:
            assert layer == first_block - 1
        else:  # the stage's closing layer norm
            assert layer == first_block + depths[stage] - 1
    # hub names (transformers 4 layout) get the same ids
    assert built.layer_id("segformer.encoder.block.2.1.mlp.fc1.weight") == 4
    assert built.layer_id("segformer.encoder.patch_embeddings.2.proj.weight") == 2


@pytest.mark.parametrize("arch,size", [("dinov3", "test"), ("segformer", "mini")])
def test_group_learning_rates_equal_the_formula_after_schedule_steps(arch, size):
    built = build_model(arch=arch, size=size, class_names=CLASSES)
    task = SegmentationTask(built.module)
    decay, mult, base_lr = 0.8, 0.1, 1e-3
    scale = layer_decay_scale(layer_id=built.layer_id, num_layers=built.num_layers, layer_decay=decay,
                              backbone_lr_mult=mult)
    groups = build_param_groups(task.named_parameters(), weight_decay=0.05, lr_scale_of=scale)
    optimizer = torch.optim.AdamW(groups, lr=base_lr)
    schedule = LRSchedule(base_lr=base_lr, total_steps=10, kind="cosine", warmup_steps=2)
    names = dict(task.named_parameters())
    for step in (0, 1, 5, 9):
        schedule.apply(optimizer, step)
        for group in optimizer.param_groups:
            for name in group["names"]:
                layer = built.layer_id(name.removeprefix("model."))
                expected_scale = 1.0 if layer is None else mult * decay ** (built.num_layers + 1 - layer)
                assert group["lr"] == pytest.approx(base_lr * schedule.factor(step) * expected_scale, rel=1e-12)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len(names)
    assert all(g["params"] for g in groups)


def test_freezing_cut_and_groups_cover_exactly_the_trainable_set():
    built = build_model(arch="dinov3", size="test", class_names=CLASSES)
    task = SegmentationTask(built.module)
    plan = UnfreezePlan(0.75, ((5, 0.5), (9, 0.0)))
    assert [plan.frozen_fraction(s) for s in (0, 4, 5, 8, 9, 100)] == [0.75, 0.75, 0.5, 0.5, 0.0, 0.0]
    assert [plan.is_boundary(s) for s in (4, 5, 9)] == [False, True, True]
    for fraction in (0.0, 0.5, 0.75, 1.0):
        frozen = set(set_frozen(task.named_parameters(), layer_id=built.layer_id, num_layers=4, fraction=fraction))
        cut = frozen_layer_count(fraction, 4)
        for name, param in task.named_parameters():
            layer = built.layer_id(name.removeprefix("model."))
            assert (name in frozen) == (layer is not None and layer < cut)
            assert param.requires_grad == (name not in frozen)
        groups = build_param_groups(task.named_parameters(), weight_decay=0.1)
        grouped = {n for g in groups for n in g["names"]}
        assert grouped == {n for n, p in task.named_parameters() if p.requires_grad}
        assert all(g["params"] for g in groups)
    assert frozen_layer_count(1.0, 4) == 6  # the whole backbone, final norm included
