"""Per-sample transforms: geometric steps applied to image and mask alike, then normalisation.

Randomness comes from a generator the caller seeds per (run seed, epoch, sample index), so a
sample is transformed identically whatever the number of workers or processes, and a resumed
run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mapsage_ds.data.classes import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Normalize:
    """uint8 [3,H,W] -> float32 standardised with the backbone's pretraining statistics."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(3, 1, 1) * 255.0
        std = torch.tensor(self.std).view(3, 1, 1) * 255.0
        return (image.float() - mean) / std


def pad_to(image: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom/right so both sides are at least ``size``; padded labels are ignored."""
    pad_h, pad_w = max(0, size - image.shape[-2]), max(0, size - image.shape[-1])
    if pad_h == 0 and pad_w == 0:
        return image, mask
    image = F.pad(image, (0, pad_w, 0, pad_h), value=0)
    mask = F.pad(mask, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
    return image, mask


def random_crop(
    image: torch.Tensor, mask: torch.Tensor, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random ``size``×``size`` window of image [3,H,W] and mask [H,W]."""
    image, mask = pad_to(image, mask, size)
    height, width = mask.shape
    top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
    return image[:, top:top + size, left:left + size], mask[top:top + size, left:left + size]


@dataclass(frozen=True)
class TrainTransform:
    """Random crop, optional horizontal flip, normalisation."""

    crop_size: int
    hflip: bool = True
    normalize: Normalize = Normalize()

    def __call__(self, sample: dict, generator: torch.Generator) -> dict:
        image, mask = random_crop(sample["image"], sample["mask"], self.crop_size, generator)
        if self.hflip and bool(torch.rand((), generator=generator) < 0.5):
            image, mask = image.flip(-1), mask.flip(-1)
        return {**sample, "image": self.normalize(image.contiguous()), "mask": mask.contiguous()}


@dataclass(frozen=True)
class EvalTransform:
    """Normalisation only: evaluation sees whole images, identically in every experiment."""

    normalize: Normalize = Normalize()

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        return {**sample, "image": self.normalize(sample["image"])}
