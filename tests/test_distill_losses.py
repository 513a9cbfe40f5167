"""Distillation losses against independent computations: KL with ignored pixels, the T² convention, features."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mapsage_ds.errors import ConfigError
from mapsage_ds.losses.distill import DistillationLoss, feature_distillation, kl_distillation, valid_fraction

IGNORE = 255


def _reference_kl(student: np.ndarray, teacher: np.ndarray, weight: np.ndarray, temperature: float) -> float:
    """T² · Σ_pixels w · Σ_c p_t (log p_t − log p_s) / Σ w, pixel by pixel in float64 numpy."""
    total, norm = 0.0, 0.0
    n, c, h, w = student.shape
    for i in range(n):
        for y in range(h):
            for x in range(w):
                if weight[i, y, x] == 0:
                    continue
                s = student[i, :, y, x] / temperature
                t = teacher[i, :, y, x] / temperature
                log_ps = s - (s.max() + math.log(np.exp(s - s.max()).sum()))
                log_pt = t - (t.max() + math.log(np.exp(t - t.max()).sum()))
                total += weight[i, y, x] * float((np.exp(log_pt) * (log_pt - log_ps)).sum())
                norm += weight[i, y, x]
    return temperature**2 * total / norm


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kl_matches_an_independent_computation_with_ignored_pixels(temperature: float) -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 7, 6, 5, generator=generator) * 3
    teacher = torch.randn(2, 7, 6, 5, generator=generator) * 3
    target = torch.randint(0, 7, (2, 6, 5), generator=generator)
    target[0, :3] = IGNORE
    target[1, :, 4] = IGNORE
    loss = DistillationLoss(kl=1.0, temperature=temperature, ignore_index=IGNORE)
    parts = loss(student_logits=student, teacher_logits=teacher, target=target)
    valid = (target != IGNORE).numpy().astype(np.float64)
    expected = _reference_kl(student.double().numpy(), teacher.double().numpy(), valid, temperature)
    assert parts["loss_kl"].item() == pytest.approx(expected, rel=1e-5)
    assert parts["loss"].item() == pytest.approx(expected, rel=1e-5)
    # torch's own KL on the valid pixels only, as a second opinion.
    keep = target != IGNORE
    log_ps = F.log_softmax(student / temperature, 1).permute(0, 2, 3, 1)[keep]
    log_pt = F.log_softmax(teacher / temperature, 1).permute(0, 2, 3, 1)[keep]
    torch_kl = F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * temperature**2
    assert parts["loss_kl"].item() == pytest.approx(torch_kl.item(), rel=1e-5)


def test_ignored_pixels_do_not_change_the_kl() -> None:
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(1, 7, 4, 4, generator=generator), torch.randn(1, 7, 4, 4, generator=generator)
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 0] = IGNORE
    before = kl_distillation(student, teacher, temperature=2.0, weight=valid_fraction(target, (4, 4),
                                                                                       ignore_index=IGNORE))
    student[0, :, 0] += torch.randn(7, 4, generator=generator) * 10  # only ignored pixels change
    after = kl_distillation(student, teacher, temperature=2.0, weight=valid_fraction(target, (4, 4),
                                                                                      ignore_index=IGNORE))
    assert after.item() == pytest.approx(before.item(), rel=1e-6)
    all_ignored = torch.full((1, 4, 4), IGNORE)
    zero = kl_distillation(student.requires_grad_(), teacher, temperature=2.0,
                           weight=valid_fraction(all_ignored, (4, 4), ignore_index=IGNORE))
    assert zero.item() == 0.0
    zero.backward()  # still part of the graph


def test_kl_on_the_student_grid_weights_cells_by_their_valid_label_fraction() -> None:
    """Labels at 2× the logits' grid: each logit cell counts with the share of its 2×2 label block not ignored."""
    generator = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(1, 3, 2, 2, generator=generator), torch.randn(1, 3, 2, 2, generator=generator)
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 0, 0] = IGNORE  # cell (0,0): 3/4 valid
    target[0, 2:, 2:] = IGNORE  # cell (1,1): 0 valid
    weights = np.array([[[0.75, 1.0], [1.0, 0.0]]])
    expected = _reference_kl(student.double().numpy(), teacher.double().numpy(), weights, 1.5)
    parts = DistillationLoss(kl=1.0, temperature=1.5)(student_logits=student, teacher_logits=teacher, target=target)
    assert parts["loss_kl"].item() == pytest.approx(expected, rel=1e-5)


def test_teacher_logits_on_another_grid_are_resized_to_the_students() -> None:
    generator = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 4, 4, generator=generator)
    resized = F.interpolate(teacher, size=(8, 8), mode="bilinear", align_corners=False)
    assert kl_distillation(student, teacher, temperature=2.0).item() == pytest.approx(
        kl_distillation(student, resized, temperature=2.0).item(), rel=1e-6)


def test_temperature_squared_keeps_the_gradient_scale() -> None:
    """With the T² factor the gradient tends to (s − t)/C·… independent of T; without it, it shrinks as 1/T²."""
    generator = torch.Generator().manual_seed(4)
    teacher = torch.randn(1, 5, 3, 3, generator=generator) * 0.1
    student = (teacher + torch.randn(1, 5, 3, 3, generator=generator) * 0.1).requires_grad_()
    norms = {}
    for temperature in (4.0, 8.0, 16.0):
        student.grad = None
        kl_distillation(student, teacher, temperature=temperature).backward()
        norms[temperature] = student.grad.norm().item()
    # Small logits over T: softmax is linear in logits/T, so the T² factor cancels the 1/T² of the gradient.
    assert norms[8.0] == pytest.approx(norms[4.0], rel=0.02)
    assert norms[16.0] == pytest.approx(norms[4.0], rel=0.02)
    # The value itself: T² · KL at temperature T equals the plain KL at temperature 1 of logits/T.
    value = kl_distillation(student, teacher, temperature=3.0)
    plain = kl_distillation(student / 3.0, teacher / 3.0, temperature=1.0)
    assert value.item() == pytest.approx(9.0 * plain.item(), rel=1e-6)


def test_identical_logits_give_zero_kl() -> None:
    logits = torch.randn(2, 7, 4, 4)
    assert kl_distillation(logits, logits.clone(), temperature=2.0).abs().item() < 1e-6


def test_feature_losses_match_their_definitions() -> None:
    generator = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(2, 8, 3, 4, generator=generator), torch.randn(2, 8, 3, 4, generator=generator)
    s, t = student.permute(0, 2, 3, 1).reshape(-1, 8).double(), teacher.permute(0, 2, 3, 1).reshape(-1, 8).double()
    cosine = (s * t).sum(1) / (s.norm(dim=1) * t.norm(dim=1))
    assert feature_distillation(student, teacher, kind="cosine").item() == pytest.approx(
        (1 - cosine).mean().item(), rel=1e-5)
    assert feature_distillation(student, teacher, kind="mse").item() == pytest.approx(
        ((s - t) ** 2).mean().item(), rel=1e-5)
    # Cosine is scale-free; aligned features give 0.
    assert feature_distillation(student * 7.0, student, kind="cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert feature_distillation(-student, student, kind="cosine").item() == pytest.approx(2.0, abs=1e-5)


def test_the_composite_weights_its_parts_and_reports_them_unweighted() -> None:
    generator = torch.Generator().manual_seed(6)
    student, teacher = torch.randn(1, 7, 4, 4, generator=generator), torch.randn(1, 7, 4, 4, generator=generator)
    fs, ft = torch.randn(1, 6, 2, 2, generator=generator), torch.randn(1, 6, 2, 2, generator=generator)
    loss = DistillationLoss(kl=0.5, temperature=2.0, feature=3.0, feature_loss="mse")
    parts = loss(student_logits=student, teacher_logits=teacher, student_features=fs, teacher_features=ft)
    assert set(parts) == {"loss", "loss_kl", "loss_feature"}
    assert parts["loss"].item() == pytest.approx(0.5 * parts["loss_kl"].item() + 3.0 * parts["loss_feature"].item())
    only_features = DistillationLoss(kl=0.0, feature=1.0)(student_features=fs, teacher_features=ft)
    assert set(only_features) == {"loss", "loss_feature"}


def test_bad_settings_are_errors() -> None:
    with pytest.raises(ConfigError, match="temperature"):
        DistillationLoss(temperature=0.0)
    with pytest.raises(ConfigError, match="feature_loss"):
        DistillationLoss(feature_loss="l1")
    with pytest.raises(ConfigError, match="same classes"):
        kl_distillation(torch.randn(1, 7, 2, 2), torch.randn(1, 8, 2, 2), temperature=1.0)
    with pytest.raises(ConfigError, match="project"):
        feature_distillation(torch.randn(1, 4, 2, 2), torch.randn(1, 8, 2, 2))
