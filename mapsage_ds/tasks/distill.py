"""Knowledge distillation: a frozen teacher's logits and features teach the segmentation student.

The student, its supervised loss, its optional boundary head and :meth:`predict` are those of
:class:`~mapsage_ds.tasks.SegmentationTask`; this task adds the teacher's targets (from the live
teacher or from its cache) and a learned 1×1 projection of student features onto the teacher's
patch grid. ``self.model`` is still the plain student — what gets evaluated and exported; the
projection is trained beside it and never exported; the teacher is not a submodule at all.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mapsage_ds.errors import ConfigError, MapSageError
from mapsage_ds.losses import CompositeLoss
from mapsage_ds.losses.distill import DistillationLoss
from mapsage_ds.tasks.segmentation import SegmentationTask, upsample_logits
from mapsage_ds.tasks.teacher import FrozenTeacher, TeacherOutputs

TeacherSource = Callable[[dict[str, torch.Tensor]], TeacherOutputs]


class FeatureProjection(nn.Module):
    """1×1 convolution from the student's feature channels to the teacher's, then resize to the teacher's grid.

    Shape:
        - features: (N, C_student, h, w) -> (N, C_teacher, *size)
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, features: torch.Tensor, *, size: tuple[int, int]) -> torch.Tensor:
        projected = self.conv(features)
        if tuple(projected.shape[-2:]) != tuple(size):
            projected = F.interpolate(projected, size=size, mode="bilinear", align_corners=False)
        return projected


class DistillationTask(SegmentationTask):
    """Student forward, supervised loss and distillation losses from a frozen teacher.

    ``loss = supervised_weight · supervised + kl · KL_T + feature · feature_distance``. The
    returned dict holds the total, every supervised part (``loss_ce``, ...), their weighted sum
    ``loss_supervised`` and the distillation parts ``loss_kl`` / ``loss_feature``, all logged.

    Args:
        model: The student (see :class:`SegmentationTask`); with feature distillation it must
            return ``.hidden_states`` maps when called with ``output_hidden_states=True``.
        teacher: Maps a batch to :class:`TeacherOutputs`: a :class:`FrozenTeacher` or a
            :class:`~mapsage_ds.teacher_cache.TeacherCache`. Stored as a plain attribute.
        distill_loss: The weighted KL and feature terms.
        supervised_weight: Weight of the student's supervised loss (0: distillation only).
        projection: Student features -> teacher channels; required with feature distillation.
        student_feature_level: Which of the student's ``hidden_states`` is projected.
        ignore_index: Label value excluded from every loss.
        loss: The student's supervised composite loss.
        boundary_head: Optional auxiliary boundary head (see :class:`SegmentationTask`).
        frozen_teacher: The teacher whose weights :meth:`finish` verifies; defaults to ``teacher``
            when that is a :class:`FrozenTeacher` (give it when ``teacher`` is a cache).
    """

    def __init__(self, model: nn.Module, *, teacher: TeacherSource, distill_loss: DistillationLoss,
                 supervised_weight: float = 1.0, projection: FeatureProjection | None = None,
                 student_feature_level: int = 2, ignore_index: int = 255, loss: CompositeLoss | None = None,
                 boundary_head: nn.Module | None = None, frozen_teacher: FrozenTeacher | None = None) -> None:
        super().__init__(model, ignore_index=ignore_index, loss=loss, boundary_head=boundary_head)
        if isinstance(teacher, nn.Module):
            raise ConfigError("the teacher must not be an nn.Module inside the task (it would be trained, "
                              "partitioned and saved with the student); wrap it in FrozenTeacher")
        if supervised_weight < 0:
            raise ConfigError(f"distill.supervised={supervised_weight}: expected a weight >= 0")
        if distill_loss.needs_features and projection is None:
            raise ConfigError("feature distillation (distill.feature > 0) needs a feature projection")
        # object.__setattr__ keeps it out of nn.Module's registries whatever it is.
        object.__setattr__(self, "teacher", teacher)
        object.__setattr__(self, "frozen_teacher",
                           frozen_teacher or (teacher if isinstance(teacher, FrozenTeacher) else None))
        self.distill_loss, self.supervised_weight = distill_loss, float(supervised_weight)
        self.projection = projection if distill_loss.needs_features else None
        self.student_feature_level = student_feature_level

    def _ignore_target(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Labels whose ignored pixels the KL skips; a MixUp batch also skips its partners' ignored pixels."""
        mask = batch["mask"]
        if batch.get("mask_mix") is None:
            return mask
        return torch.where(batch["mask_mix"] == self.ignore_index, self.ignore_index, mask)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss, its named parts and logits of ``{"image": [N,3,H,W], "mask": [N,H,W], "seed": [N]}``."""
        images = batch["image"]
        size = tuple(images.shape[-2:])
        hidden = self.boundary_head is not None or self.projection is not None
        output = self.model(pixel_values=images.to(self._dtype()), output_hidden_states=hidden)
        logits = upsample_logits(output.logits.float(), size)
        boundary_logits = None
        if self.boundary_head is not None:
            boundary_logits = self.boundary_head(output.hidden_states, image_size=size).float()
        supervised = self.loss(logits, batch["mask"], boundary_logits=boundary_logits,
                               mix_target=batch.get("mask_mix"), mix_lambda=batch.get("mix_lambda"))
        targets = self.teacher(batch)
        student_features = None
        if self.projection is not None:
            student_features = self.projection(output.hidden_states[self.student_feature_level],
                                               size=tuple(targets.features.shape[-2:]))
        distill = self.distill_loss(student_logits=output.logits, teacher_logits=targets.logits,
                                    target=self._ignore_target(batch), student_features=student_features,
                                    teacher_features=targets.features)
        total = self.supervised_weight * supervised["loss"] + distill["loss"]
        parts = {k: v for k, v in supervised.items() if k != "loss"}
        parts |= {k: v for k, v in distill.items() if k != "loss"}
        return {"loss": total, **parts, "loss_supervised": supervised["loss"], "logits": logits}

    def finish(self, output_dir: str | Path, *, is_main: bool) -> dict[str, Any]:
        """Check that the teacher's weights are bitwise what was loaded; rank 0 writes ``teacher_check.json``.

        Raises:
            MapSageError: When the teacher changed (or there is no teacher to check).
        """
        teacher = self.frozen_teacher
        if teacher is None:
            raise MapSageError("distillation task: no frozen teacher to check")
        at_end = teacher.final_digest()
        record = {"path": teacher.source, "dtype": str(teacher.dtype), "digest_at_load": teacher.digest_at_load,
                  "digest_at_end": at_end, "unchanged": at_end == teacher.digest_at_load}
        if is_main:
            (Path(output_dir) / "teacher_check.json").write_text(json.dumps(record, indent=2) + "\n")
        return record
