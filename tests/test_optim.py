"""Tests of the learning-rate schedule (against independent formulas) and of the parameter groups."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from mapsage_ds.optim import LRSchedule, build_param_groups

# --- LRSchedule.factor against formulas written out here ---------------------------------------


def _warmup(step: int, warmup: int, start: float) -> float:
    # Linear from `start` at step 0 towards 1 at step `warmup` (reached on the first decay step).
    return start + (1 - start) * step / warmup


def _cosine(step: int, total: int, warmup: int, floor: float) -> float:
    t = min(1.0, (step - warmup) / (total - warmup))
    return floor + (1 - floor) * (1 + math.cos(math.pi * t)) / 2


def _poly(step: int, total: int, warmup: int, floor: float, power: float) -> float:
    t = min(1.0, (step - warmup) / (total - warmup))
    return floor + (1 - floor) * (1 - t) ** power


TOTAL, WARMUP, START, FLOOR = 100, 10, 0.01, 0.05


@pytest.mark.parametrize("warmup", [0, WARMUP])
@pytest.mark.parametrize("step", [0, 1, 5, 9, 10, 11, 37, 55, 99, 100, 150])
def test_cosine_matches_formula(step: int, warmup: int) -> None:
    schedule = LRSchedule(base_lr=1.0, total_steps=TOTAL, kind="cosine", warmup_steps=warmup,
                          warmup_start_factor=START, min_lr_ratio=FLOOR)
    expected = _warmup(step, warmup, START) if step < warmup else _cosine(step, TOTAL, warmup, FLOOR)
    assert schedule.factor(step) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("power", [1.0, 0.9, 2.0])
@pytest.mark.parametrize("warmup", [0, WARMUP])
@pytest.mark.parametrize("step", [0, 3, 9, 10, 42, 99, 100, 101])
def test_poly_matches_formula(step: int, warmup: int, power: float) -> None:
    schedule = LRSchedule(base_lr=1.0, total_steps=TOTAL, kind="poly", warmup_steps=warmup,
                          warmup_start_factor=START, min_lr_ratio=FLOOR, poly_power=power)
    expected = _warmup(step, warmup, START) if step < warmup else _poly(step, TOTAL, warmup, FLOOR, power)
    assert schedule.factor(step) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("warmup", [0, WARMUP])
@pytest.mark.parametrize("step", [0, 4, 9, 10, 50, 100, 200])
def test_constant_matches_formula(step: int, warmup: int) -> None:
    schedule = LRSchedule(base_lr=1.0, total_steps=TOTAL, kind="constant", warmup_steps=warmup,
                          warmup_start_factor=START, min_lr_ratio=FLOOR)
    expected = _warmup(step, warmup, START) if step < warmup else 1.0
    assert schedule.factor(step) == pytest.approx(expected, abs=1e-12)


def test_known_values_at_the_landmarks() -> None:
    cosine = LRSchedule(base_lr=1.0, total_steps=TOTAL, kind="cosine", warmup_steps=WARMUP,
                        warmup_start_factor=START, min_lr_ratio=FLOOR)
    assert cosine.factor(0) == pytest.approx(START)  # warmup starts at the start factor
    assert cosine.factor(9) == pytest.approx(START + (1 - START) * 0.9)  # last warmup step: 9/10 of the way
    assert cosine.factor(10) == pytest.approx(1.0)  # first decay step: the full learning rate
    # Halfway through decay (step 10 + 90/2 = 55) cos(π/2) = 0, so the shape is 1/2.
    assert cosine.factor(55) == pytest.approx(FLOOR + (1 - FLOOR) * 0.5)
    assert cosine.factor(100) == pytest.approx(FLOOR)  # the end is the floor ...
    assert cosine.factor(1000) == pytest.approx(FLOOR)  # ... and stays there

    poly = LRSchedule(base_lr=1.0, total_steps=TOTAL, kind="poly", warmup_steps=0, poly_power=2.0)
    assert poly.factor(50) == pytest.approx(0.25)  # (1 - 1/2)²
    assert poly.factor(100) == 0.0


@pytest.mark.parametrize("kind", ["cosine", "poly", "constant"])
def test_warmup_rises_and_decay_never_rises(kind: str) -> None:
    schedule = LRSchedule(base_lr=1.0, total_steps=TOTAL, kind=kind, warmup_steps=WARMUP,
                          warmup_start_factor=START, min_lr_ratio=FLOOR)
    factors = [schedule.factor(s) for s in range(TOTAL + 5)]
    assert all(a < b for a, b in zip(factors[:WARMUP], factors[1:WARMUP + 1], strict=True))
    assert all(a >= b for a, b in zip(factors[WARMUP:], factors[WARMUP + 1:], strict=False))
    assert max(factors) == pytest.approx(1.0) and min(factors) >= min(START, FLOOR)


# --- LRSchedule.apply on a real optimizer -------------------------------------------------------


def test_apply_sets_base_times_scale_times_factor() -> None:
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(3, 2)) for _ in range(4)]
    scales = [1.0, 0.5, 0.125, None]  # the last group has no lr_scale: treated as 1
    groups = [{"params": [p], **({"lr_scale": s} if s is not None else {})}
              for p, s in zip(params, scales, strict=True)]
    optimizer = torch.optim.AdamW(groups, lr=123.0, weight_decay=0.0)
    base = 4e-3
    schedule = LRSchedule(base_lr=base, total_steps=20, kind="cosine", warmup_steps=5)

    for step in (0, 3, 5, 12, 20):
        returned = schedule.apply(optimizer, step)
        assert returned == pytest.approx(base * schedule.factor(step))
        for group, scale in zip(optimizer.param_groups, scales, strict=True):
            assert group["lr"] == pytest.approx(base * (1.0 if scale is None else scale) * schedule.factor(step))


def test_the_optimizer_steps_with_the_learning_rate_apply_set() -> None:
    # AdamW's first step with bias correction moves each weight by lr·g/(|g|+eps) ≈ lr·sign(g)
    # when weight decay is 0, so the size of the move reads back the learning rate each group used.
    torch.manual_seed(1)
    params = [nn.Parameter(torch.randn(5)) for _ in range(2)]
    optimizer = torch.optim.AdamW([{"params": [params[0]], "lr_scale": 1.0}, {"params": [params[1]], "lr_scale": 0.25}],
                                  lr=1.0, weight_decay=0.0, eps=1e-12)
    schedule = LRSchedule(base_lr=0.1, total_steps=10, kind="poly", warmup_steps=0)
    lr = schedule.apply(optimizer, 2)  # poly power 1: 0.1 × (1 - 2/10) = 0.08
    assert lr == pytest.approx(0.08)
    before = [p.detach().clone() for p in params]
    sum((p ** 2).sum() for p in params).backward()
    optimizer.step()
    for p, old, scale in zip(params, before, (1.0, 0.25), strict=True):
        torch.testing.assert_close((old - p.detach()).abs(), torch.full_like(old, 0.08 * scale), rtol=1e-5, atol=0)


# --- parameter groups on a tiny SegFormer --------------------------------------------------------

DECAY = 0.05


@pytest.fixture(scope="module")
def segformer() -> SegformerForSemanticSegmentation:
    torch.manual_seed(0)
    config = SegformerConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 8, 16, 16], num_attention_heads=[1, 1, 1, 1],
                             decoder_hidden_size=16, num_labels=7)
    return SegformerForSemanticSegmentation(config)


def _expected_decay(model: nn.Module) -> dict[str, float]:
    """Weight decay of every parameter, decided from the module types rather than from names."""
    expected = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, nn.Linear | nn.Conv2d) and param_name == "weight":
                expected[name] = DECAY
            elif isinstance(module, nn.Linear | nn.Conv2d | nn.LayerNorm | nn.BatchNorm2d):
                expected[name] = 0.0  # biases and norm affine parameters
            else:
                raise AssertionError(f"test does not know how to classify {name} ({type(module).__name__})")
    return expected


def _check_partition(groups: list[dict], model: nn.Module) -> None:
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    seen: list[int] = []
    for group in groups:
        assert group["params"], "empty group"
        assert len(group["params"]) == len(group["names"])
        for name, param in zip(group["names"], group["params"], strict=True):
            assert model.get_parameter(name) is param
            seen.append(id(param))
    assert len(seen) == len(set(seen)), "a parameter is in two groups"
    assert set(seen) == {id(p) for p in trainable.values()}


def test_every_trainable_parameter_in_exactly_one_group(segformer: SegformerForSemanticSegmentation) -> None:
    groups = build_param_groups(segformer.named_parameters(), weight_decay=DECAY)
    _check_partition(groups, segformer)
    assert len(groups) == 2  # one scale × (decay, no decay)
    # torch accepts the groups as they are (it refuses a parameter listed twice).
    torch.optim.AdamW(groups, lr=1e-3)


def test_frozen_parameters_are_in_no_group(segformer: SegformerForSemanticSegmentation) -> None:
    frozen = [p for name, p in segformer.named_parameters() if "patch_embeddings" in name]
    assert len(frozen) == 16  # 4 stages × (conv weight, conv bias, norm weight, norm bias)
    try:
        for p in frozen:
            p.requires_grad_(False)
        groups = build_param_groups(segformer.named_parameters(), weight_decay=DECAY)
        _check_partition(groups, segformer)
        grouped = {id(p) for g in groups for p in g["params"]}
        assert not grouped & {id(p) for p in frozen}
    finally:
        for p in frozen:
            p.requires_grad_(True)


def test_all_frozen_gives_no_groups(segformer: SegformerForSemanticSegmentation) -> None:
    frozen = [(name, nn.Parameter(p.detach(), requires_grad=False)) for name, p in segformer.named_parameters()]
    assert build_param_groups(frozen, weight_decay=DECAY) == []


def test_norms_and_biases_get_no_decay(segformer: SegformerForSemanticSegmentation) -> None:
    expected = _expected_decay(segformer)
    groups = build_param_groups(segformer.named_parameters(), weight_decay=DECAY)
    actual = {name: group["weight_decay"] for group in groups for name in group["names"]}
    assert actual == expected
    # Both kinds are really present in this model.
    assert DECAY in expected.values() and 0.0 in expected.values()
    assert all(g["lr_scale"] == 1.0 for g in groups)


def _stage_scale(name: str) -> float:
    # Layer-decay-like scales: earlier encoder stages learn slower, the decode head at full rate.
    # Encoder names are `segformer.stages.N.…` (transformers 5) or `segformer.encoder.block.N.…` (4.x).
    found = re.match(r"segformer\..*?(?:stages|block|patch_embeddings|layer_norm)\.(\d)\.", name)
    return (0.125, 0.25, 0.5, 0.5)[int(found.group(1))] if found else 1.0


def test_lr_scale_callback_makes_separate_groups(segformer: SegformerForSemanticSegmentation) -> None:
    groups = build_param_groups(segformer.named_parameters(), weight_decay=DECAY, lr_scale_of=_stage_scale)
    _check_partition(groups, segformer)
    expected_decay = _expected_decay(segformer)
    keys = [(g["lr_scale"], g["weight_decay"]) for g in groups]
    assert len(keys) == len(set(keys)), "two groups with the same (scale, decay)"
    # Every scale the callback produces, crossed with both decay kinds that occur at that scale.
    expected_keys = {(_stage_scale(n), expected_decay[n]) for n, _ in segformer.named_parameters()}
    assert set(keys) == expected_keys
    assert {scale for scale, _ in keys} == {0.125, 0.25, 0.5, 1.0}
    assert len(groups) == 8
    for group in groups:
        assert all(_stage_scale(n) == group["lr_scale"] for n in group["names"])
        assert all(expected_decay[n] == group["weight_decay"] for n in group["names"])
    # The schedule then gives each group its own learning rate.
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    LRSchedule(base_lr=0.01, total_steps=10, kind="constant").apply(optimizer, 0)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx([0.00125, 0.0025, 0.005, 0.01])
