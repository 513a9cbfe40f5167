"""Pure loss maths for semantic segmentation; the ``nn.Module`` wrappers live beside this file.

Conventions shared by every function here:

- ``logits`` are raw scores [N, C, h, w]; they are bilinearly resized to the target's size first.
- ``target`` holds class indices [N, H, W]; pixels equal to ``ignore_index`` take no part in any
  loss (they are never one-hot encoded, never selected, never averaged in), and their logits
  receive exactly zero gradient.
- Region losses (Dice, Lovász) are computed over the whole batch at once and averaged over the
  classes present in the (non-ignored) target; a batch without valid pixels gives a zero loss
  that still carries a graph.
- Everything is computed in float32 whatever the logits' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_to_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Logits [N,C,h,w] bilinearly resized to the target's [H,W] (no-op when equal), in float32.

    Shape:
        - logits: (N, C, h, w)
        - target: (N, H, W)
        - output: (N, C, H, W)
    """
    logits = logits.float()
    if logits.shape[-2:] == target.shape[-2:]:
        return logits
    return F.interpolate(logits, size=tuple(target.shape[-2:]), mode="bilinear", align_corners=False)


# Smallest positive float32: the denominator of a mean over no pixels, so that it is 0, not NaN.
_TINY = torch.finfo(torch.float32).tiny


def zero_loss(logits: torch.Tensor) -> torch.Tensor:
    """A zero scalar connected to ``logits`` (so backward still reaches every parameter)."""
    return logits.sum() * 0.0


def _safe_target(target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(target with ignored pixels set to class 0, validity mask); 255 never reaches one-hot or gather."""
    valid = target != ignore_index
    return torch.where(valid, target, torch.zeros_like(target)), valid


def pixel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel (class-weighted, label-smoothed) cross-entropy and per-pixel normaliser.

    The mean cross-entropy over any set of pixels S is ``loss[S].sum() / norm[S].sum()``; over
    all valid pixels this equals ``F.cross_entropy(..., reduction="mean")``. Ignored pixels
    have loss 0 and norm 0.

    Returns:
        (loss, norm), both float32 [N, H, W]; ``norm`` is the class weight of the pixel's label
        (1 without class weights) and 0 on ignored pixels.
    """
    logits = resize_to_target(logits, target)
    weight = None if class_weights is None else class_weights.to(logits.device, torch.float32)
    loss = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    safe, valid = _safe_target(target, ignore_index)
    norm = valid.float() if weight is None else weight[safe] * valid
    return loss, norm


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy over the valid pixels (weighted mean with class weights).

    Shape:
        - logits: (N, C, h, w)
        - target: (N, H, W)
        - output: scalar
    """
    loss, norm = pixel_cross_entropy(logits, target, ignore_index=ignore_index, class_weights=class_weights,
                                     label_smoothing=label_smoothing)
    # torch's own mean over zero valid pixels is NaN; this is 0 then. No data-dependent branch:
    # nothing waits for the device, and torch.compile sees one graph.
    return loss.sum() / norm.sum().clamp_min(_TINY)


@torch.no_grad()
def ohem_keep_mask(
    logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int, thresh: float, min_kept: int
) -> torch.Tensor:
    """Which pixels online hard-example mining keeps.

    Rule: a valid pixel is hard when the softmax probability of its true class is below
    ``thresh``. When fewer than ``K = min(min_kept × N, valid pixels)`` pixels are hard, the
    ``K`` valid pixels with the lowest true-class probability are kept instead (ties broken by
    a stable sort over the flattened pixel order), so at least ``K`` pixels always contribute.

    Args:
        logits: Raw scores (N, C, h, w).
        target: Labels (N, H, W).
        ignore_index: Label never kept.
        thresh: Probability below which a pixel is hard.
        min_kept: Minimum number of kept pixels per image of the batch.

    Returns:
        A bool mask (N, H, W).
    """
    probs = resize_to_target(logits, target).softmax(dim=1)
    safe, valid = _safe_target(target, ignore_index)
    p_true = probs.gather(1, safe.unsqueeze(1)).squeeze(1)
    keep = valid & (p_true < thresh)
    wanted = min(min_kept * target.shape[0], int(valid.sum()))
    if int(keep.sum()) >= wanted:
        return keep
    # Too few hard pixels: keep the `wanted` lowest-probability valid pixels instead.
    scores = torch.where(valid, p_true, torch.full_like(p_true, float("inf"))).flatten()
    order = torch.sort(scores, stable=True).indices[:wanted]
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[order] = True
    return keep.view_as(target)


def ohem_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int,
    thresh: float,
    min_kept: int,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy averaged over the pixels :func:`ohem_keep_mask` keeps (weighted mean).

    Shape:
        - logits: (N, C, h, w)
        - target: (N, H, W)
        - output: scalar
    """
    keep = ohem_keep_mask(logits, target, ignore_index=ignore_index, thresh=thresh, min_kept=min_kept)
    loss, norm = pixel_cross_entropy(logits, target, ignore_index=ignore_index, class_weights=class_weights,
                                     label_smoothing=label_smoothing)
    total = norm[keep].sum()
    return loss[keep].sum() / total if total > 0 else zero_loss(loss)


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int, smooth: float = 0.0, eps: float = 1e-7
) -> torch.Tensor:
    """Soft Dice loss of the softmax probabilities, averaged over the classes present in the target.

    Per class c over the valid pixels of the batch: ``1 − (2·Σ p_c·t_c + smooth) / (Σ p_c + Σ t_c + smooth)``,
    the denominator clamped to at least ``eps``. Ignored pixels count neither in the probabilities
    nor in the target.

    Shape:
        - logits: (N, C, h, w)
        - target: (N, H, W)
        - output: scalar
    """
    logits = resize_to_target(logits, target)
    num_classes = logits.shape[1]
    probs = logits.softmax(dim=1)
    safe, valid = _safe_target(target, ignore_index)
    validf = valid.float()
    p_true = probs.gather(1, safe.unsqueeze(1)).squeeze(1) * validf
    zeros = probs.new_zeros(num_classes)
    # Per-class sums by label, without materialising a one-hot target.
    intersection = zeros.scatter_add(0, safe.flatten(), p_true.flatten())
    target_sum = zeros.scatter_add(0, safe.flatten(), validf.flatten())
    prob_sum = (probs * validf.unsqueeze(1)).sum(dim=(0, 2, 3))
    dice = (2.0 * intersection + smooth) / (prob_sum + target_sum + smooth).clamp_min(eps)
    present = (target_sum > 0).float()
    # The mean over the classes present; 0 when none is (all pixels ignored), without a branch.
    return ((1.0 - dice) * present).sum() / present.sum().clamp_min(1.0)


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. errors sorted in decreasing order.

    Computed independently for every column (class) of ``gt_sorted``.

    Shape:
        - gt_sorted: (P, C) float ground-truth indicators, in the order of the sorted errors
        - output: (P, C)
    """
    gts = gt_sorted.sum(dim=0)
    intersection = gts - gt_sorted.cumsum(dim=0)
    union = gts + (1.0 - gt_sorted).cumsum(dim=0)
    jaccard = 1.0 - intersection / union
    jaccard[1:] = jaccard[1:] - jaccard[:-1].clone()
    return jaccard


def lovasz_softmax(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int) -> torch.Tensor:
    """Lovász-softmax loss (Berman et al., 2018) over the batch, averaged over the present classes.

    For every class, the errors ``|1[y=c] − p_c|`` of the valid pixels are sorted in decreasing
    order and dotted with :func:`lovasz_grad`; all classes are processed in one sort.

    Shape:
        - logits: (N, C, h, w)
        - target: (N, H, W)
        - output: scalar
    """
    logits = resize_to_target(logits, target)
    num_classes = logits.shape[1]
    probs = logits.softmax(dim=1).movedim(1, -1).reshape(-1, num_classes)
    labels = target.reshape(-1)
    valid = labels != ignore_index
    probs, labels = probs[valid], labels[valid]
    if labels.numel() == 0:
        return zero_loss(logits)
    foreground = F.one_hot(labels, num_classes).float()
    errors = (foreground - probs).abs()
    errors_sorted, order = errors.sort(dim=0, descending=True)
    per_class = (errors_sorted * lovasz_grad(foreground.gather(0, order))).sum(dim=0)
    present = foreground.sum(dim=0) > 0
    return per_class[present].mean()


@torch.no_grad()
def boundary_targets(target: torch.Tensor, *, ignore_index: int, radius: int = 1) -> torch.Tensor:
    """Class-boundary map derived from a label map, ignore-aware.

    A valid pixel is a boundary pixel (1) when another *valid* label occurs within its
    (2·radius+1)² window, otherwise 0; ignored pixels stay ``ignore_index``. The edge of a
    no-data region is therefore not a class boundary, and the image border is not one either.

    Shape:
        - target: (N, H, W) labels
        - output: (N, H, W) int64 in {0, 1, ignore_index}
    """
    valid = target != ignore_index
    labels = target.float().unsqueeze(1)
    size = 2 * radius + 1
    # max_pool2d pads with -inf, which never wins the max (nor, negated, the min).
    high = F.max_pool2d(torch.where(valid.unsqueeze(1), labels, torch.full_like(labels, -1.0)), size, 1, radius)
    low = -F.max_pool2d(torch.where(valid.unsqueeze(1), -labels, torch.full_like(labels, -1e9)), size, 1, radius)
    edge = ((high != labels) | (low != labels)).squeeze(1) & valid
    return torch.where(valid, edge.long(), torch.full_like(target, ignore_index))


def balanced_boundary_bce(boundary_logits: torch.Tensor, edges: torch.Tensor, *, ignore_index: int) -> torch.Tensor:
    """Class-balanced binary cross-entropy of boundary logits against a boundary map.

    The loss is the mean of the mean BCE over boundary pixels and the mean BCE over non-boundary
    pixels (boundaries are a few percent of the pixels, so an unweighted mean would learn "no
    boundary anywhere"); a side without pixels is left out; ignored pixels never count.

    Shape:
        - boundary_logits: (N, 1, h, w) or (N, h, w)
        - edges: (N, H, W) in {0, 1, ignore_index}, e.g. from :func:`boundary_targets`
        - output: scalar
    """
    if boundary_logits.dim() == 3:
        boundary_logits = boundary_logits.unsqueeze(1)
    logits = resize_to_target(boundary_logits, edges).squeeze(1)
    valid = edges != ignore_index
    positive = valid & (edges == 1)
    negative = valid & (edges == 0)
    bce = F.binary_cross_entropy_with_logits(logits, positive.float(), reduction="none")
    sides = torch.stack([positive, negative]).flatten(1).float()  # (2, pixels)
    counts = sides.sum(dim=1)
    means = (sides * bce.flatten()).sum(dim=1) / counts.clamp_min(1.0)
    present = (counts > 0).float()
    # The mean of the sides that have pixels; 0 when neither has (all ignored), without a branch.
    return (means * present).sum() / present.sum().clamp_min(1.0)
