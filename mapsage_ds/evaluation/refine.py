"""SAM boundary refinement: sharpen predicted class regions with Segment Anything.

For every connected region of a predicted class (largest first), SAM gets the region's
bounding box and its innermost pixel as a positive point, and returns a mask with a predicted
IoU. The refined mask replaces the coarse one only where SAM is confident:

* a region whose predicted IoU is below ``score_threshold`` changes nothing;
* a pixel near the region (inside its box grown by ``box_margin``) that SAM puts inside the
  object with probability >= ``confidence`` takes the region's class (the most confident
  claim wins where regions compete);
* a pixel of the coarse region that SAM puts outside with probability >= ``confidence``
  leaves the class, for the coarse model's best other class (unless another region claims it);
* pixels marked invalid (e.g. no-data) are never changed.

SAM is transformers' ``SamModel`` / ``SamProcessor``, from a local directory or Meta's ``.pth`` files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from mapsage_ds.errors import ConfigError, DataError

__all__ = ["Region", "SamRefiner", "apply_region_masks", "find_regions", "load_sam"]

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# Hub checkpoints carry preprocessor_config.json; transformers 5 save_pretrained writes processor_config.json.
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


@dataclass(frozen=True)
class Region:
    """One connected region of a predicted class, with its SAM prompts.

    Attributes:
        label: The class.
        mask: bool ``[H, W]``, the region's pixels.
        box: ``(x0, y0, x1, y1)`` pixel bounds, inclusive-exclusive.
        point: ``(x, y)`` of the pixel farthest from the region's edge.
    """

    label: int
    mask: np.ndarray
    box: tuple[int, int, int, int]
    point: tuple[int, int]


def find_regions(labels: np.ndarray, *, num_classes: int, min_area: int, max_regions: int) -> list[Region]:
    """Connected regions (8-connectivity) of each predicted class, largest first.

    Args:
        labels: ``[H, W]`` predicted classes.
        num_classes: Classes to look for (``0..num_classes-1``).
        min_area: Smaller regions are left alone (SAM prompts on specks are noise).
        max_regions: At most this many regions, the largest.
    """
    regions = []
    structure = np.ones((3, 3), dtype=bool)
    for label in range(num_classes):
        components, count = ndimage.label(labels == label, structure=structure)
        if count == 0:
            continue
        areas = np.bincount(components.ravel(), minlength=count + 1)
        for index, bounds in enumerate(ndimage.find_objects(components), start=1):
            if bounds is None or areas[index] < min_area:
                continue
            regions.append((int(areas[index]), label, index, bounds, components))
    regions.sort(key=lambda r: -r[0])
    found = []
    for _, label, index, (rows, cols), components in regions[:max_regions]:
        mask = components == index
        # Innermost pixel: the maximum of the distance to the nearest pixel outside the region.
        local = np.pad(mask[rows, cols], 1)
        depth = ndimage.distance_transform_edt(local)[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
        found.append(Region(label, mask, (cols.start, rows.start, cols.stop, rows.stop),
                            (cols.start + int(x), rows.start + int(y))))
    return found


def _grown_boxes(boxes: Tensor, margin: float, height: int, width: int) -> Tensor:
    """Bool ``[R, H, W]``: each box grown by ``margin`` of its side (at least 2 px)."""
    x0, y0, x1, y1 = boxes.unbind(dim=1)
    grow_x = torch.clamp((x1 - x0) * margin, min=2).ceil()
    grow_y = torch.clamp((y1 - y0) * margin, min=2).ceil()
    cols = torch.arange(width, device=boxes.device).view(1, 1, -1)
    rows = torch.arange(height, device=boxes.device).view(1, -1, 1)
    inside_x = (cols >= (x0 - grow_x).view(-1, 1, 1)) & (cols < (x1 + grow_x).view(-1, 1, 1))
    inside_y = (rows >= (y0 - grow_y).view(-1, 1, 1)) & (rows < (y1 + grow_y).view(-1, 1, 1))
    return inside_x & inside_y


def apply_region_masks(
    labels: Tensor,
    probabilities: Tensor,
    *,
    region_labels: Tensor,
    region_masks: Tensor,
    region_boxes: Tensor,
    mask_probabilities: Tensor,
    scores: Tensor,
    score_threshold: float,
    confidence: float,
    box_margin: float,
    valid: Tensor | None = None,
) -> Tensor:
    """Replace coarse regions by refined masks where the refiner is confident.

    This is the replacement rule of the module docstring, independent of SAM: any source of
    per-region foreground probabilities and region scores works.

    Shape:
        - labels: ``[H, W]`` int64 coarse classes.
        - probabilities: ``[C, H, W]`` coarse class probabilities (pick the fallback class).
        - region_labels: ``[R]`` int64; region_masks: ``[R, H, W]`` bool; region_boxes:
          ``[R, 4]`` ``(x0, y0, x1, y1)``; mask_probabilities: ``[R, H, W]`` in [0, 1];
          scores: ``[R]``.
        - valid: ``[H, W]`` bool, pixels that may change (None: all).
        - output: ``[H, W]`` int64.

    Returns:
        The refined classes.
    """
    if region_labels.numel() == 0:
        return labels.clone()
    height, width = labels.shape
    usable = (scores >= score_threshold).view(-1, 1, 1)
    near = _grown_boxes(region_boxes.float(), box_margin, height, width)
    claim = torch.where(usable & near, mask_probabilities, torch.zeros_like(mask_probabilities))
    best, owner = claim.max(dim=0)
    added = best >= confidence
    # Pixels SAM confidently puts outside their own (usable) coarse region.
    rejected = (usable & region_masks & (mask_probabilities <= 1.0 - confidence)).any(dim=0)
    refined = labels.clone()
    if bool(rejected.any()):
        others = probabilities.clone()
        others.scatter_(0, labels.unsqueeze(0), float("-inf"))
        refined = torch.where(rejected, others.argmax(dim=0), refined)
    refined = torch.where(added, region_labels[owner], refined)
    if valid is not None:
        refined = torch.where(valid, refined, labels)
    return refined


def load_sam(source: str | Path, *, device: torch.device):
    """``SamModel`` (eval mode, on ``device``) and its ``SamProcessor``.

    ``source`` is a transformers SAM directory or one of Meta's ``sam_vit_{b,l,h}_*.pth`` files
    (converted in memory, :mod:`mapsage_ds.models.convert.sam`). A directory's own processor config
    is used when it has one; otherwise the processor is Meta's preprocessing at the model's input size.

    Raises:
        MissingFileError: If ``source`` (or a file a directory needs) does not exist.
        DataError: If the file is unreadable or not a SAM 1 checkpoint.
    """
    from transformers import SamProcessor

    from mapsage_ds.models.convert.sam import load_sam as load_sam_model
    from mapsage_ds.models.convert.sam import sam_processor

    path = Path(source)
    model = load_sam_model(path).to(device).eval()
    if path.is_dir() and any((path / name).is_file() for name in _PROCESSOR_FILES):
        processor = SamProcessor.from_pretrained(str(path), local_files_only=True)
    else:
        processor = sam_processor(model.config.vision_config.image_size)
    return model, processor


class SamRefiner:
    """Refines predicted class regions with SAM (see the module docstring for the rule).

    Args:
        model: A transformers ``SamModel``.
        processor: Its ``SamProcessor``.
        device: Where SAM runs.
        score_threshold: Minimum SAM predicted IoU for a region's mask to be used.
        confidence: Minimum SAM probability (inside or outside) for a pixel to change.
        min_region_area: Regions smaller than this (pixels) are not prompted.
        max_regions: At most this many regions per image, the largest.
        box_margin: Claims reach this fraction of the box side beyond the region's box.
    """

    def __init__(self, model, processor, *, device: torch.device, score_threshold: float = 0.8,
                 confidence: float = 0.9, min_region_area: int = 64, max_regions: int = 32,
                 box_margin: float = 0.25) -> None:
        if not 0.5 < confidence <= 1.0:
            raise ConfigError(f"SAM confidence must lie in (0.5, 1], got {confidence}")
        if min_region_area < 1 or max_regions < 1 or box_margin < 0:
            raise ConfigError(f"SAM refinement: min_region_area={min_region_area}, max_regions={max_regions}, "
                              f"box_margin={box_margin}: expected >= 1, >= 1 and >= 0")
        self.model, self.processor, self.device = model, processor, device
        self.score_threshold, self.confidence = score_threshold, confidence
        self.min_region_area, self.max_regions, self.box_margin = min_region_area, max_regions, box_margin

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, device: torch.device, **settings) -> SamRefiner:
        """Load SAM from a local directory or a Meta checkpoint file (see :func:`load_sam`)."""
        model, processor = load_sam(model_dir, device=device)
        return cls(model, processor, device=device, **settings)

    @torch.no_grad()
    def refine(self, images: Tensor, probabilities: Tensor, *, valid: Tensor | None = None) -> Tensor:
        """Refined classes of a batch.

        Shape:
            - images: ``[N, 3, H, W]`` uint8.
            - probabilities: ``[N, C, H, W]`` coarse class probabilities.
            - valid: ``[N, H, W]`` bool, pixels that may change (None: all).
            - output: ``[N, H, W]`` int64.

        Raises:
            DataError: If the images are not uint8 or the shapes disagree.
        """
        if images.dtype != torch.uint8:
            raise DataError(f"SAM refinement needs the raw uint8 images, got dtype {images.dtype}")
        if images.shape[0] != probabilities.shape[0] or images.shape[-2:] != probabilities.shape[-2:]:
            raise DataError(f"images {tuple(images.shape)} and probabilities {tuple(probabilities.shape)} disagree")
        refined = [self._refine_one(images[i], probabilities[i], None if valid is None else valid[i])
                   for i in range(images.shape[0])]
        return torch.stack(refined)

    def _refine_one(self, image: Tensor, probabilities: Tensor, valid: Tensor | None) -> Tensor:
        labels = probabilities.argmax(dim=0)
        regions = find_regions(labels.cpu().numpy(), num_classes=probabilities.shape[0],
                               min_area=self.min_region_area, max_regions=self.max_regions)
        if not regions:
            return labels
        mask_probabilities, scores = self._sam_masks(image, regions)
        device = probabilities.device
        return apply_region_masks(
            labels, probabilities,
            region_labels=torch.tensor([r.label for r in regions], device=device),
            region_masks=torch.from_numpy(np.stack([r.mask for r in regions])).to(device),
            region_boxes=torch.tensor([r.box for r in regions], device=device),
            mask_probabilities=mask_probabilities.to(device), scores=scores.to(device),
            score_threshold=self.score_threshold, confidence=self.confidence, box_margin=self.box_margin,
            valid=valid,
        )

    def _sam_masks(self, image: Tensor, regions: list[Region]) -> tuple[Tensor, Tensor]:
        """SAM foreground probabilities ``[R, H, W]`` and predicted IoUs ``[R]``, one per region."""
        picture = image.permute(1, 2, 0).cpu().numpy()
        inputs = self.processor(
            images=picture,
            input_boxes=[[list(map(float, r.box)) for r in regions]],
            input_points=[[[list(map(float, r.point))] for r in regions]],
            input_labels=[[[1] for _ in regions]],
            return_tensors="pt",
        )
        dtype = next(self.model.parameters()).dtype
        outputs = self.model(
            pixel_values=inputs["pixel_values"].to(self.device, dtype),
            input_boxes=inputs["input_boxes"].to(self.device, dtype),
            input_points=inputs["input_points"].to(self.device, dtype),
            input_labels=inputs["input_labels"].to(self.device),
            multimask_output=False,
        )
        (logits,) = self.processor.post_process_masks(
            outputs.pred_masks.float().cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"], binarize=False
        )
        return logits[:, 0].sigmoid(), outputs.iou_scores.float()[0, :, 0].cpu()
