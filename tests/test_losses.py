"""Losses: agreement with independent references, ignore handling, gradients and known minima."""

from __future__ import annotations

import pytest
import segmentation_models_pytorch.losses as smp_losses  # test-only reference: pip install -e .[test]
import torch
import torch.nn.functional as F

from mapsage_ds.errors import ConfigError
from mapsage_ds.losses import (
    BoundaryLoss,
    CrossEntropyLoss,
    DiceLoss,
    LovaszSoftmaxLoss,
    OhemCrossEntropyLoss,
    build_loss,
)
from mapsage_ds.losses import functional as LF

IGNORE = 255
C = 5


def random_case(seed: int, *, n: int = 2, size: int = 12, ignore_fraction: float = 0.25, classes: int = C):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, size, size, generator=gen) * 2.0
    target = torch.randint(0, classes, (n, size, size), generator=gen)
    target[torch.rand(n, size, size, generator=gen) < ignore_fraction] = IGNORE
    return logits.requires_grad_(), target


def perfect_logits(target: torch.Tensor, classes: int = C, scale: float = 40.0) -> torch.Tensor:
    return F.one_hot(torch.where(target == IGNORE, 0, target), classes).permute(0, 3, 1, 2).float() * scale


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("smooth", [0.0, 1.0])
def test_dice_matches_smp(seed, smooth):
    logits, target = random_case(seed)
    present = sorted(set(target[target != IGNORE].tolist()))
    # smp adds `smooth` once to 2·I and 2·(|P|+|T|)/2; ours adds it to the plain 2I / (|P|+|T|) form.
    reference = smp_losses.DiceLoss("multiclass", classes=present, ignore_index=IGNORE, smooth=smooth / 2)
    ours = DiceLoss(ignore_index=IGNORE, smooth=smooth)(logits, target)
    assert ours.item() == pytest.approx(reference(logits, target).item(), abs=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_lovasz_matches_smp(seed):
    logits, target = random_case(seed)
    reference = smp_losses.LovaszLoss("multiclass", per_image=False, ignore_index=IGNORE)(logits, target)
    ours = LovaszSoftmaxLoss(ignore_index=IGNORE)(logits, target)
    assert ours.item() == pytest.approx(reference.item(), abs=1e-5)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_ref,) = torch.autograd.grad(smp_losses.LovaszLoss("multiclass", ignore_index=IGNORE)(logits, target), logits)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-6, rtol=1e-4)


def test_cross_entropy_weights_and_smoothing_match_a_direct_formula():
    logits, target = random_case(7)
    weights = torch.tensor([0.5, 1.0, 2.0, 1.5, 3.0])
    eps = 0.1
    ours = CrossEntropyLoss(ignore_index=IGNORE, class_weights=weights.tolist(), label_smoothing=eps)(logits, target)
    # Direct: (1−ε)·Σ −w_y·log p_y / Σ w_y  +  ε/C·Σ_pixels Σ_c −w_c·log p_c / Σ w_y (torch's definition).
    logp = logits.detach().log_softmax(1).movedim(1, -1)[target != IGNORE]
    y = target[target != IGNORE]
    nll = -(weights[y] * logp.gather(1, y[:, None]).squeeze(1)).sum() / weights[y].sum()
    smooth = -(logp * weights).sum(1).sum() / weights[y].sum() / C
    assert ours.item() == pytest.approx(((1 - eps) * nll + eps * smooth).item(), abs=1e-5)


def ohem_reference(logits, target, thresh, min_kept):
    """The selection rule written out pixel by pixel in Python."""
    probs = logits.detach().softmax(1)
    pixels = [(i, y, x) for i in range(target.shape[0]) for y in range(target.shape[1]) for x in range(target.shape[2])
              if target[i, y, x] != IGNORE]
    p_true = {p: probs[p[0], target[p], p[1], p[2]].item() for p in pixels}
    hard = [p for p in pixels if p_true[p] < thresh]
    k = min(min_kept * target.shape[0], len(pixels))
    if len(hard) < k:
        hard = sorted(pixels, key=lambda p: p_true[p])[:k]
    rows = torch.stack([logits[i, :, y, x] for i, y, x in hard])
    labels = torch.tensor([target[p].item() for p in hard])
    return F.cross_entropy(rows, labels), len(hard)


@pytest.mark.parametrize(("thresh", "min_kept"), [(0.7, 4), (0.3, 60), (0.05, 1000), (1.0, 0)])
def test_ohem_matches_direct_selection(thresh, min_kept):
    logits, target = random_case(11)
    reference, kept = ohem_reference(logits, target, thresh, min_kept)
    mask = LF.ohem_keep_mask(logits, target, ignore_index=IGNORE, thresh=thresh, min_kept=min_kept)
    assert int(mask.sum()) == kept
    assert not mask[target == IGNORE].any()
    ours = OhemCrossEntropyLoss(thresh=thresh, min_kept=min_kept, ignore_index=IGNORE)(logits, target)
    assert ours.item() == pytest.approx(reference.item(), abs=1e-5)


def test_boundary_targets_known_answer():
    target = torch.tensor([[[0, 0, 0, 1, 1, 1],
                            [0, 0, 0, 1, 1, 1],
                            [2, 2, IGNORE, IGNORE, 1, 1],
                            [2, 2, IGNORE, IGNORE, 1, 1]]])
    edges = LF.boundary_targets(target, ignore_index=IGNORE, radius=1)
    expected = torch.tensor([[[0, 0, 1, 1, 0, 0],
                              [1, 1, 1, 1, 0, 0],
                              [1, 1, IGNORE, IGNORE, 0, 0],
                              [0, 0, IGNORE, IGNORE, 0, 0]]])
    assert torch.equal(edges, expected)


def test_boundary_loss_is_balanced_bce():
    target = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [IGNORE] * 4]])
    logits = torch.randn(1, 1, 3, 4)
    edges = LF.boundary_targets(target, ignore_index=IGNORE)
    bce = F.binary_cross_entropy_with_logits(logits[0, 0], (edges[0] == 1).float(), reduction="none")
    expected = (bce[edges[0] == 1].mean() + bce[edges[0] == 0].mean()) / 2
    assert BoundaryLoss(ignore_index=IGNORE)(logits, target).item() == pytest.approx(expected.item(), abs=1e-6)


def all_losses():
    return {
        "ce": lambda lg, t: CrossEntropyLoss(class_weights=[1, 2, 1, 1, 0.5], label_smoothing=0.1)(lg, t),
        "ohem": lambda lg, t: OhemCrossEntropyLoss(thresh=0.7, min_kept=10)(lg, t),
        "dice": lambda lg, t: DiceLoss()(lg, t),
        "lovasz": lambda lg, t: LovaszSoftmaxLoss()(lg, t),
        "boundary": lambda lg, t: BoundaryLoss()(lg[:, :1], t),
    }


@pytest.mark.parametrize("name", list(all_losses()))
def test_ignored_pixels_never_count_and_gradients_are_finite(name):
    loss_fn = all_losses()[name]
    logits, target = random_case(3)
    loss = loss_fn(logits, target)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    ignored = (target == IGNORE).unsqueeze(1).expand_as(grad)
    assert (grad[ignored] == 0).all()
    # Whatever the logits say at ignored pixels, the loss does not change.
    moved = logits.detach() + 5.0 * torch.randn_like(logits) * ignored
    assert loss_fn(moved, target).item() == pytest.approx(loss.item(), abs=1e-6)


@pytest.mark.parametrize("name", ["ce", "ohem", "dice", "lovasz", "boundary"])
def test_all_ignored_batch_gives_zero_loss_with_a_graph(name):
    logits = torch.randn(1, C, 6, 6, requires_grad=True)
    loss = all_losses()[name](logits, torch.full((1, 6, 6), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and (logits.grad == 0).all()


def test_perfect_prediction_is_the_minimum():
    _, target = random_case(5)
    perfect = perfect_logits(target)
    for name in ("dice", "lovasz"):
        loss_fn = all_losses()[name]
        assert loss_fn(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
        for seed in range(3):
            assert loss_fn(random_case(seed)[0].detach(), target).item() > 0.05
    assert CrossEntropyLoss()(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    # With label smoothing ε the minimum sits at the smoothed distribution, not at one-hot.
    eps = 0.1
    smoothed = torch.log(F.one_hot(torch.where(target == IGNORE, 0, target), C).float() * (1 - eps) + eps / C)
    smoothed = smoothed.permute(0, 3, 1, 2)
    loss_fn = CrossEntropyLoss(label_smoothing=eps)
    best = loss_fn(smoothed, target).item()
    assert best < loss_fn(perfect, target).item()
    assert best < loss_fn(smoothed + 0.3 * torch.randn_like(smoothed), target).item()
    edges = LF.boundary_targets(target, ignore_index=IGNORE)
    boundary_perfect = ((edges == 1).float() * 2 - 1).unsqueeze(1) * 40
    assert BoundaryLoss()(boundary_perfect, target).item() == pytest.approx(0.0, abs=1e-6)


def test_logits_are_resized_to_the_target():
    logits, target = random_case(2, size=16)
    small = logits.detach()[:, :, ::2, ::2]
    resized = F.interpolate(small, size=(16, 16), mode="bilinear", align_corners=False)
    for name in ("ce", "dice", "lovasz"):
        assert all_losses()[name](small, target).item() == pytest.approx(all_losses()[name](resized, target).item())


def test_composite_weights_parts_and_mixup():
    logits, target = random_case(9)
    boundary_logits = torch.randn(2, 1, 6, 6)
    loss = build_loss(ce=1.0, dice=0.5, lovasz=0.25, boundary=0.2, num_classes=C)
    out = loss(logits, target, boundary_logits=boundary_logits)
    assert set(out) == {"loss", "loss_ce", "loss_dice", "loss_lovasz", "loss_boundary"}
    parts = {"ce": CrossEntropyLoss()(logits, target), "dice": DiceLoss()(logits, target),
             "lovasz": LovaszSoftmaxLoss()(logits, target), "boundary": BoundaryLoss()(boundary_logits, target)}
    for name, value in parts.items():
        assert out[f"loss_{name}"].item() == pytest.approx(value.item(), abs=1e-6)
    expected = parts["ce"] + 0.5 * parts["dice"] + 0.25 * parts["lovasz"] + 0.2 * parts["boundary"]
    assert out["loss"].item() == pytest.approx(expected.item(), abs=1e-6)

    other = torch.roll(target, 1, 0)
    mixed = loss(logits, target, boundary_logits=boundary_logits, mix_target=other, mix_lambda=0.3)
    second = loss(logits, other, boundary_logits=boundary_logits)
    for key in out:
        assert mixed[key].item() == pytest.approx(0.3 * out[key].item() + 0.7 * second[key].item(), abs=1e-5)

    ohem = build_loss(ce=1.0, ohem_thresh=0.7, ohem_min_kept=5)
    assert set(ohem(logits, target)) == {"loss", "loss_ce"}
    with pytest.raises(ConfigError, match="boundary_head"):
        loss(logits, target)
    with pytest.raises(ConfigError, match="class_weights"):
        build_loss(class_weights=[1.0, 2.0], num_classes=C)
    with pytest.raises(ConfigError, match="every weight is 0"):
        build_loss(ce=0.0)
