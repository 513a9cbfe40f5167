"""Distillation losses: pixel-wise KL at a temperature (T² convention) and feature matching.

Both are pure functions of tensors plus a small callable that weights them; the learned 1×1
projection of student features lives in the distillation task (it is trained, never exported).

Temperature convention (Hinton et al., 2015): both distributions are softened by ``T`` and the
KL is multiplied by ``T²``. The gradient of ``KL(softmax(t/T) ‖ softmax(s/T))`` with respect to
the student logits ``s`` scales as ``1/T²`` for large ``T``; the ``T²`` factor keeps the
distillation term's gradient on the same scale as the supervised loss whatever ``T`` is, so the
loss weights need no retuning when ``T`` changes. ``T = 1`` is the plain KL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mapsage_ds.errors import ConfigError

FEATURE_LOSSES = ("cosine", "mse")


def valid_fraction(target: torch.Tensor, size: tuple[int, int], *, ignore_index: int) -> torch.Tensor:
    """Fraction of non-ignored label pixels under each cell of a coarser grid.

    Shape:
        - target: (N, H, W) labels
        - output: (N, h, w) float in [0, 1] (area average of the valid mask; exact 0/1 at equal size)
    """
    valid = (target != ignore_index).float().unsqueeze(1)
    if tuple(valid.shape[-2:]) != tuple(size):
        valid = F.adaptive_avg_pool2d(valid, size)
    return valid.squeeze(1)


def kl_distillation(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T² · KL(softmax(teacher / T) ‖ softmax(student / T))`` averaged over pixels of the student's grid.

    The teacher's logits are resized (bilinear) to the student's grid when they differ; each
    pixel counts with ``weight`` (e.g. :func:`valid_fraction`, so ignored pixels count 0).

    Shape:
        - student_logits: (N, C, h, w)
        - teacher_logits: (N, C, h', w')
        - weight: (N, h, w) or None (every pixel weight 1)
        - output: scalar (0 with a gradient path when every weight is 0)

    Raises:
        ConfigError: On a non-positive temperature or a class-count mismatch.
    """
    if temperature <= 0:
        raise ConfigError(f"distill.temperature={temperature}: expected a value > 0")
    if student_logits.shape[1] != teacher_logits.shape[1]:
        raise ConfigError(f"teacher has {teacher_logits.shape[1]} classes, student {student_logits.shape[1]}: "
                          "distillation needs the same classes in the same order")
    student = student_logits.float()
    teacher = teacher_logits.float()
    if teacher.shape[-2:] != student.shape[-2:]:
        teacher = F.interpolate(teacher, size=student.shape[-2:], mode="bilinear", align_corners=False)
    log_p_student = F.log_softmax(student / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=1)
    per_pixel = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)  # (N, h, w)
    if weight is None:
        return per_pixel.mean() * temperature**2
    weight = weight.to(per_pixel.dtype)
    total = weight.sum()
    if total <= 0:
        return per_pixel.sum() * 0.0
    return (per_pixel * weight).sum() / total * temperature**2


def feature_distillation(student: torch.Tensor, teacher: torch.Tensor, *, kind: str = "cosine") -> torch.Tensor:
    """Distance between projected student features and teacher patch features on the teacher's grid.

    ``cosine``: mean over grid cells of ``1 − cos(student, teacher)`` along channels (scale-free;
    0 when aligned, 2 when opposite). ``mse``: mean squared difference over every element.

    Shape:
        - student: (N, D, h, w), already projected to the teacher's channels and grid
        - teacher: (N, D, h, w)
        - output: scalar

    Raises:
        ConfigError: On an unknown ``kind`` or mismatched shapes.
    """
    if kind not in FEATURE_LOSSES:
        raise ConfigError(f"distill.feature_loss={kind!r}: expected one of {', '.join(FEATURE_LOSSES)}")
    if student.shape != teacher.shape:
        raise ConfigError(f"feature distillation: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}; "
                          "project the student onto the teacher's channels and grid first")
    student, teacher = student.float(), teacher.float()
    if kind == "mse":
        return F.mse_loss(student, teacher)
    return (1.0 - F.cosine_similarity(student, teacher, dim=1, eps=1e-6)).mean()


class DistillationLoss:
    """``kl · KL_T + feature · feature_distance``, returning every part by name.

    A plain callable (no parameters), like :class:`~mapsage_ds.losses.CompositeLoss`. Parts with
    weight 0 are neither computed nor returned.

    Args:
        kl: Weight of the logit distillation term.
        temperature: Softening temperature ``T`` of the KL (with the ``T²`` factor).
        feature: Weight of the feature distillation term.
        feature_loss: ``cosine`` or ``mse``.
        ignore_index: Label value whose pixels do not count in the KL.
    """

    def __init__(self, *, kl: float = 1.0, temperature: float = 1.0, feature: float = 0.0,
                 feature_loss: str = "cosine", ignore_index: int = 255) -> None:
        if kl < 0 or feature < 0:
            raise ConfigError(f"distill.kl={kl}, distill.feature={feature}: expected weights >= 0")
        if temperature <= 0:
            raise ConfigError(f"distill.temperature={temperature}: expected a value > 0")
        if feature_loss not in FEATURE_LOSSES:
            raise ConfigError(f"distill.feature_loss={feature_loss!r}: expected one of {', '.join(FEATURE_LOSSES)}")
        self.kl, self.temperature, self.feature = float(kl), float(temperature), float(feature)
        self.feature_loss, self.ignore_index = feature_loss, ignore_index

    @property
    def needs_logits(self) -> bool:
        """Whether the teacher's logits are used."""
        return self.kl > 0

    @property
    def needs_features(self) -> bool:
        """Whether the teacher's (and the student's projected) features are used."""
        return self.feature > 0

    def __call__(
        self,
        *,
        student_logits: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        student_features: torch.Tensor | None = None,
        teacher_features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Weighted total and unweighted parts.

        Args:
            student_logits: (N, C, h, w) on the student's output grid.
            teacher_logits: (N, C, h', w').
            target: (N, H, W) labels (the ignore mask), or None to count every pixel.
            student_features: (N, D, h'', w'') projected student features.
            teacher_features: (N, D, h'', w'') teacher patch features.

        Returns:
            ``{"loss": total, "loss_kl": ..., "loss_feature": ...}`` (only the configured parts).
        """
        parts: dict[str, torch.Tensor] = {}
        if self.needs_logits:
            weight = None
            if target is not None:
                weight = valid_fraction(target, tuple(student_logits.shape[-2:]), ignore_index=self.ignore_index)
            parts["kl"] = kl_distillation(student_logits, teacher_logits, temperature=self.temperature, weight=weight)
        if self.needs_features:
            parts["feature"] = feature_distillation(student_features, teacher_features, kind=self.feature_loss)
        weights = {"kl": self.kl, "feature": self.feature}
        total = sum(weights[name] * value for name, value in parts.items())
        return {"loss": total, **{f"loss_{name}": value for name, value in parts.items()}}
