"""The weighted combination of segmentation losses a recipe asks for, returning every part by name."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mapsage_ds.errors import ConfigError
from mapsage_ds.losses.boundary import BoundaryLoss
from mapsage_ds.losses.cross_entropy import CrossEntropyLoss
from mapsage_ds.losses.dice import DiceLoss
from mapsage_ds.losses.lovasz import LovaszSoftmaxLoss
from mapsage_ds.losses.ohem import OhemCrossEntropyLoss

# Names of the parts, in the order they are computed and logged (as "loss_<name>").
PART_NAMES = ("ce", "dice", "lovasz", "boundary")


class CompositeLoss:
    """``loss = Σ weight_k · part_k`` over the parts with a non-zero weight.

    A plain callable, not an ``nn.Module``: it holds no parameters or buffers, and keeping its
    parts out of the task's module tree keeps ZeRO-3's traced submodule order independent of the
    data (a MixUp batch evaluates every part twice, and ranks may differ in that).

    The returned dict holds ``"loss"`` (the weighted total) and ``"loss_<name>"`` for every
    part, unweighted, so logs show each term on its own scale.

    A MixUp batch (``mix_target`` and ``mix_lambda`` given) is scored as
    ``λ · parts(target) + (1 − λ) · parts(mix_target)``, part by part.

    Args:
        segmentation: Name -> (weight, loss module taking ``(logits, target)``).
        boundary: (weight, loss module taking ``(boundary_logits, target)``), or None.
    """

    def __init__(self, segmentation: dict[str, tuple[float, nn.Module]],
                 boundary: tuple[float, nn.Module] | None = None) -> None:
        if not segmentation and boundary is None:
            raise ConfigError("loss: every weight is 0; give at least one of ce, dice, lovasz a weight > 0")
        self.weights = {name: float(weight) for name, (weight, _) in segmentation.items()}
        self.parts = {name: module for name, (_, module) in segmentation.items()}
        self.boundary_weight = None if boundary is None else float(boundary[0])
        self.boundary = None if boundary is None else boundary[1]

    @property
    def needs_boundary_logits(self) -> bool:
        """Whether :meth:`forward` needs ``boundary_logits`` (a boundary head must exist)."""
        return self.boundary is not None

    def _parts(self, logits: torch.Tensor, target: torch.Tensor,
               boundary_logits: torch.Tensor | None) -> dict[str, torch.Tensor]:
        values = {name: module(logits, target) for name, module in self.parts.items()}
        if self.boundary is not None:
            if boundary_logits is None:
                raise ConfigError("loss.boundary > 0 needs boundary logits: set model.boundary_head=true")
            values["boundary"] = self.boundary(boundary_logits, target)
        return values

    def __call__(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        *,
        boundary_logits: torch.Tensor | None = None,
        mix_target: torch.Tensor | None = None,
        mix_lambda: torch.Tensor | float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Total and per-part losses.

        Args:
            logits: Class scores (N, C, h, w).
            target: Labels (N, H, W).
            boundary_logits: Boundary scores (N, 1, h', w') when a boundary part is configured.
            mix_target: Labels of the MixUp partners (N, H, W), or None.
            mix_lambda: Weight of ``target`` in the MixUp blend (scalar), or None.

        Returns:
            ``{"loss": total, "loss_<name>": part, ...}``.
        """
        values = self._parts(logits, target, boundary_logits)
        if mix_target is not None:
            lam = torch.as_tensor(mix_lambda, dtype=torch.float32, device=logits.device)
            other = self._parts(logits, mix_target, boundary_logits)
            values = {name: lam * values[name] + (1.0 - lam) * other[name] for name in values}
        weights = dict(self.weights)
        if self.boundary_weight is not None:
            weights["boundary"] = self.boundary_weight
        total = sum(weights[name] * values[name] for name in values)
        return {"loss": total, **{f"loss_{name}": value for name, value in values.items()}}


def build_loss(
    *,
    ce: float = 1.0,
    dice: float = 0.0,
    lovasz: float = 0.0,
    boundary: float = 0.0,
    class_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    ohem_thresh: float | None = None,
    ohem_min_kept: int = 100_000,
    boundary_radius: int = 1,
    ignore_index: int = 255,
    num_classes: int | None = None,
) -> CompositeLoss:
    """The composite loss a recipe's ``loss`` section describes; parts with weight 0 are left out.

    Args:
        ce: Weight of the cross-entropy (OHEM cross-entropy when ``ohem_thresh`` is set).
        dice: Weight of the Dice loss.
        lovasz: Weight of the Lovász-softmax loss.
        boundary: Weight of the boundary loss (needs a boundary head).
        class_weights: Per-class cross-entropy weights, or None.
        label_smoothing: Cross-entropy label smoothing.
        ohem_thresh: OHEM probability threshold; None for plain cross-entropy.
        ohem_min_kept: OHEM minimum kept pixels per image.
        boundary_radius: Half-width of the boundary band in label pixels.
        ignore_index: Label excluded everywhere.
        num_classes: When given, ``class_weights`` must have this many entries.

    Raises:
        ConfigError: On a negative weight, all-zero weights or a class-weight count mismatch.
    """
    weights = {"ce": ce, "dice": dice, "lovasz": lovasz, "boundary": boundary}
    negative = [f"loss.{name}={value}" for name, value in weights.items() if value < 0]
    if negative:
        raise ConfigError(f"loss weights must be >= 0: {', '.join(negative)}")
    if class_weights is not None and num_classes is not None and len(class_weights) != num_classes:
        raise ConfigError(f"loss.class_weights has {len(class_weights)} entries; "
                          f"expected one per class ({num_classes})")
    ce_kwargs = dict(ignore_index=ignore_index, class_weights=class_weights, label_smoothing=label_smoothing)
    modules: dict[str, tuple[float, nn.Module]] = {}
    if ce > 0:
        modules["ce"] = (ce, CrossEntropyLoss(**ce_kwargs) if ohem_thresh is None else
                         OhemCrossEntropyLoss(thresh=ohem_thresh, min_kept=ohem_min_kept, **ce_kwargs))
    if dice > 0:
        modules["dice"] = (dice, DiceLoss(ignore_index=ignore_index))
    if lovasz > 0:
        modules["lovasz"] = (lovasz, LovaszSoftmaxLoss(ignore_index=ignore_index))
    boundary_part = None
    if boundary > 0:
        boundary_part = (boundary, BoundaryLoss(ignore_index=ignore_index, radius=boundary_radius))
    return CompositeLoss(modules, boundary_part)
