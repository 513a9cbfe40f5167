"""Per-sample transforms: geometric steps applied to image and mask alike, then normalisation.

Randomness comes from a generator the caller seeds per (run seed, epoch, sample index), so a
sample is transformed identically whatever the number of workers or processes, and a resumed
run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from mapsage_ds.data.classes import IGNORE_INDEX

if TYPE_CHECKING:
    import albumentations as A

_INTERPOLATIONS = ("bilinear", "nearest")


@functools.cache
def _albumentations() -> tuple[ModuleType, ModuleType]:
    """Albumentations and OpenCV, imported on first use: inference and evaluation never need them (≈ 70 MB)."""
    # albumentations asks a web server for a newer version at import unless told not to; training
    # processes must not make network calls (and the cluster is often offline).
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations
    import cv2

    # DataLoader workers are forked from this process, and OpenCV's thread pool does not survive a
    # fork: a worker whose first parallel OpenCV call needs the pool waits for it forever
    # (opencv/opencv#5150, pytorch/pytorch#1355). Parallelism comes from the loader's workers.
    cv2.setNumThreads(0)
    return albumentations, cv2

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
class ColorJitter:
    """Colour jitter strengths: factors ``1 ± brightness/contrast/saturation``, hue shift ``± hue`` turns.

    Attributes:
        brightness: Brightness factor drawn from ``[1 - brightness, 1 + brightness]``.
        contrast: Contrast factor drawn from ``[1 - contrast, 1 + contrast]``.
        saturation: Saturation factor drawn from ``[1 - saturation, 1 + saturation]``.
        hue: Hue shift drawn from ``[-hue, hue]``, in turns of the colour wheel (at most 0.5).
        prob: Probability that a training crop is jittered.
    """

    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.05
    prob: float = 0.8


@dataclass(frozen=True)
class TrainTransform:
    """Per-sample training augmentation of ``{"image": uint8[3,H,W], "mask": int64[H,W]}``, then normalisation.

    Order: random rescale (factor in ``scale_range``) -> pad (image 0, mask ignored) -> random
    crop -> rotation by a random angle (new pixels: image 0, mask ignored) -> horizontal /
    vertical flips -> random multiple of 90° -> colour jitter -> normalisation. Image and mask go
    through the same geometric steps (masks always resampled nearest), so they stay aligned.

    With only crop and horizontal flip configured, the original torch implementation runs (the
    walking skeleton's runs reproduce bit for bit); anything more runs through albumentations
    (OpenCV), chosen by measurement (docs/training_recipe.md). All randomness comes from
    ``generator``; every albumentations op is reseeded from it per sample, with its own seed.

    The output also holds ``"seed"``: one more draw from ``generator``, from which batch-level
    randomness (CutMix / MixUp in :mod:`mapsage_ds.data.mixing`) is derived.

    Attributes:
        crop_size: Side of the square crop, unless the caller passes another one per batch.
        hflip: Flip left-right with probability 0.5.
        normalize: Normalisation applied last.
        scale_range: (low, high) of the random rescale factor; (1, 1) disables it.
        vflip: Flip top-bottom with probability 0.5.
        rot90: Rotate by 0, 90, 180 or 270 degrees, uniformly.
        rotate_degrees: Rotate by a uniform angle in ±this with probability ``rotate_prob``; 0 disables.
        rotate_prob: Probability of the free rotation.
        color_jitter: Colour jitter strengths, or None.
        interpolation: Image resampling of rescale and rotation, "bilinear" or "nearest".
    """

    crop_size: int
    hflip: bool = True
    normalize: Normalize = Normalize()
    scale_range: tuple[float, float] = (1.0, 1.0)
    vflip: bool = False
    rot90: bool = False
    rotate_degrees: float = 0.0
    rotate_prob: float = 0.5
    color_jitter: ColorJitter | None = None
    interpolation: str = "bilinear"
    _pipelines: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation={self.interpolation!r}: expected one of {sorted(_INTERPOLATIONS)}")
        # Imported here, in the process that builds the loader: importing OpenCV for the first time
        # inside a DataLoader worker forked from a multi-threaded parent can crash the worker.
        _albumentations()

    @property
    def is_plain(self) -> bool:
        """Whether only crop and horizontal flip are configured."""
        return (tuple(self.scale_range) == (1.0, 1.0) and not self.vflip and not self.rot90
                and self.rotate_degrees == 0 and self.color_jitter is None)

    def pipeline(self, crop_size: int) -> A.Compose:
        """The albumentations pipeline producing ``crop_size`` crops (built once per size)."""
        if crop_size not in self._pipelines:
            self._pipelines[crop_size] = self._build(crop_size)
        return self._pipelines[crop_size]

    def _build(self, size: int) -> A.Compose:
        A, cv2 = _albumentations()  # noqa: N806  (albumentations' own spelling)
        interp = {"bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}[self.interpolation]
        constant = dict(border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=IGNORE_INDEX)
        low, high = self.scale_range
        ops: list = []
        if (low, high) != (1.0, 1.0):
            ops.append(A.RandomScale(scale_limit=(low - 1.0, high - 1.0), interpolation=interp,
                                     mask_interpolation=cv2.INTER_NEAREST, p=1.0))
        ops += [A.PadIfNeeded(min_height=size, min_width=size, position="top_left", **constant),
                A.RandomCrop(height=size, width=size)]
        if self.rotate_degrees > 0:
            ops.append(A.Rotate(limit=(-self.rotate_degrees, self.rotate_degrees), interpolation=interp,
                                mask_interpolation=cv2.INTER_NEAREST, p=self.rotate_prob, **constant))
        if self.hflip:
            ops.append(A.HorizontalFlip(p=0.5))
        if self.vflip:
            ops.append(A.VerticalFlip(p=0.5))
        if self.rot90:
            ops.append(A.RandomRotate90(p=1.0))
        if self.color_jitter is not None:
            jitter = self.color_jitter
            ops.append(A.ColorJitter(brightness=jitter.brightness, contrast=jitter.contrast,
                                     saturation=jitter.saturation, hue=jitter.hue, p=jitter.prob))
        return A.Compose(ops, strict=True)

    def _augment(self, image: torch.Tensor, mask: torch.Tensor, size: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        pipeline = self.pipeline(size)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        pipeline.set_random_seed(seed)
        # Compose.set_random_seed hands every op the SAME seed (hflip and vflip would then always
        # fire together): give each op its own.
        op_seeds = np.random.SeedSequence(seed).generate_state(len(pipeline.transforms))
        for op, op_seed in zip(pipeline.transforms, op_seeds):
            op.set_random_seed(int(op_seed))
        out = pipeline(image=np.ascontiguousarray(image.permute(1, 2, 0).numpy()),
                       mask=mask.numpy().astype(np.uint8))
        return torch.from_numpy(out["image"]).permute(2, 0, 1), torch.from_numpy(out["mask"]).long()

    def __call__(self, sample: dict, generator: torch.Generator, crop_size: int | None = None) -> dict:
        """Augment one sample; ``crop_size`` (from a per-batch multi-scale sampler) overrides the default."""
        size = self.crop_size if crop_size is None else crop_size
        if self.is_plain:
            image, mask = random_crop(sample["image"], sample["mask"], size, generator)
            if self.hflip and bool(torch.rand((), generator=generator) < 0.5):
                image, mask = image.flip(-1), mask.flip(-1)
        else:
            image, mask = self._augment(sample["image"], sample["mask"], size, generator)
        seed = torch.randint(0, 2**62, (), generator=generator)
        return {**sample, "image": self.normalize(image.contiguous()), "mask": mask.contiguous(), "seed": seed}


@dataclass(frozen=True)
class EvalTransform:
    """Normalisation only: evaluation sees whole images, identically in every experiment."""

    normalize: Normalize = Normalize()

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        return {**sample, "image": self.normalize(sample["image"])}
