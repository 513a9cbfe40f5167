"""Check 4: image and label stay aligned through the training pipeline and the sliding-window path.

Each test image is painted from its mask: every pixel gets the colour of its class (the LoveDA
palette; ignored pixels black). Whatever a correct geometric pipeline does (crop, rescale,
rotate, flip, pad, slide, TTA), decoding the colours of its output image must give back its
output mask. A step applied to the image but not to the mask (or the other way round) breaks
that at once. Pixels on a class edge are left out, since resampling blends their colours.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mapsage_ds.data.classes import IGNORE_INDEX, LOVEDA_PALETTE
from mapsage_ds.data.transforms import Normalize
from mapsage_ds.evaluation.predictor import Predictor
from mapsage_ds.evaluation.protocol import EvalProtocol
from mapsage_ds.health.result import CheckResult, failed, passed

MIN_AGREEMENT = 0.99
# Class k is painted CODES[k]; the last code (black) stands for ignored pixels and padding.
CODES = torch.tensor([*LOVEDA_PALETTE, (0, 0, 0)], dtype=torch.float32)


def colour_coded_image(mask: torch.Tensor) -> torch.Tensor:
    """``uint8 [3, H, W]`` image whose pixel colours encode the labels of ``mask`` ``[H, W]``."""
    index = torch.where(mask == IGNORE_INDEX, len(LOVEDA_PALETTE), mask).long()
    if int(index.max()) > len(LOVEDA_PALETTE):
        raise ValueError(f"mask holds labels beyond the {len(LOVEDA_PALETTE)} classes")
    return CODES[index].permute(2, 0, 1).round().to(torch.uint8)


def decode_colours(image: torch.Tensor, normalize: Normalize | None) -> torch.Tensor:
    """Labels ``[..., H, W]`` of colour-coded images ``[..., 3, H, W]`` (normalised floats or uint8)."""
    pixels = image.float()
    if normalize is not None:
        mean = torch.tensor(normalize.mean).view(3, 1, 1) * 255.0
        std = torch.tensor(normalize.std).view(3, 1, 1) * 255.0
        pixels = pixels * std + mean
    distance = ((pixels.movedim(-3, -1).unsqueeze(-2) - CODES) ** 2).sum(-1)
    labels = distance.argmin(-1)
    return torch.where(labels == len(LOVEDA_PALETTE), IGNORE_INDEX, labels)


def interior(mask: torch.Tensor) -> torch.Tensor:
    """Pixels whose 3×3 neighbourhood holds one label only."""
    x = mask.float().unsqueeze(0).unsqueeze(0)
    high = F.max_pool2d(x, 3, stride=1, padding=1)
    low = -F.max_pool2d(-x, 3, stride=1, padding=1)
    return (high == low)[0, 0]


def agreement(decoded: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    """(agreeing, compared) interior pixels of one decoded image against its mask."""
    keep = interior(mask)
    return int((decoded[keep] == mask[keep]).sum()), int(keep.sum())


def check_train_alignment(transform: Callable[[dict, torch.Generator], dict], masks: Sequence[torch.Tensor], *,
                          normalize: Normalize, draws: int = 4, seed: int = 0,
                          collate: Callable[[list[dict]], dict] | None = None) -> CheckResult:
    """Colour-coded samples through ``transform`` (and a batch ``collate``) decode back to their output masks.

    Args:
        transform: The per-sample training transform, ``(sample, generator) -> sample`` with a
            normalised ``"image"`` and a ``"mask"``. Photometric steps (colour jitter) must be off.
        masks: Label masks ``[H, W]`` (0..6, 255) to paint images from.
        normalize: The statistics ``transform`` normalises with.
        draws: Random draws per mask.
        seed: Seed of the draws.
        collate: Batch step applied to all samples of a draw (e.g. CutMix), or None.
    """
    name = "4.train_alignment"
    agree = total = 0
    worst = 1.0
    for draw in range(draws):
        samples = []
        for index, mask in enumerate(masks):
            sample = {"image": colour_coded_image(mask), "mask": mask.long(), "name": f"mask{index}",
                      "seed": torch.tensor(0)}
            generator = torch.Generator().manual_seed(seed * 100_003 + draw * 1_009 + index)
            samples.append(transform(sample, generator))
        if collate is not None:
            batch = collate(samples)
            samples = [{"image": image, "mask": mask} for image, mask in zip(batch["image"], batch["mask"])]
        for sample in samples:
            a, n = agreement(decode_colours(sample["image"], normalize), sample["mask"])
            agree, total = agree + a, total + n
            worst = min(worst, a / n if n else 1.0)
    return _verdict(name, agree, total, worst, f"{draws} draws × {len(masks)} masks through the training pipeline",
                    "the training transform moves the image and the mask differently: apply every geometric step "
                    "(crop, flip, rotation, rescale, padding) to both, masks with nearest resampling")


class ColourDecoder(nn.Module):
    """A fixed 'model' that reads the class from the colour: logits are minus the distance to each code.

    Args:
        normalize: The statistics its input was normalised with.
        with_ignore: Add an eighth channel for the ignore code (black); without it every pixel
            gets one of the 7 classes, as a real model's prediction does.

    Shape:
        - pixel_values: ``[B, 3, h, w]``, normalised with ``normalize``.
        - output: ``[B, 8, h, w]`` (``[B, 7, h, w]`` without the ignore channel).
    """

    def __init__(self, normalize: Normalize, *, with_ignore: bool = True) -> None:
        super().__init__()
        codes = CODES if with_ignore else CODES[: len(LOVEDA_PALETTE)]
        self.register_buffer("mean", torch.tensor(normalize.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(normalize.std).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("codes", codes.reshape(1, -1, 3, 1, 1))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixels = pixel_values * self.std + self.mean
        return -((pixels.unsqueeze(1) - self.codes) ** 2).sum(2)


def check_inference_alignment(protocols: Sequence[EvalProtocol], masks: Sequence[torch.Tensor], *,
                              normalize: Normalize, predictor_class: type[Predictor] = Predictor) -> CheckResult:
    """Colour-coded images predicted through each protocol (slide windows, TTA) give back their masks.

    Args:
        protocols: Evaluation protocols (mode, tile, stride, TTA scales and flips) to go through.
        masks: Label masks ``[H, W]`` to paint images from.
        normalize: The statistics the predictor normalises with.
        predictor_class: The inference implementation under test (the project's :class:`Predictor`).
    """
    name = "4.inference_alignment"
    agree = total = 0
    worst = 1.0
    for protocol in protocols:
        predictor = predictor_class(ColourDecoder(normalize), normalize=normalize, protocol=protocol)
        for mask in masks:
            labels = predictor.predict(colour_coded_image(mask).unsqueeze(0))[0]
            decoded = torch.where(labels == len(LOVEDA_PALETTE), IGNORE_INDEX, labels)
            a, n = agreement(decoded, mask.long())
            agree, total = agree + a, total + n
            worst = min(worst, a / n if n else 1.0)
    what = "; ".join(p.mode + (f" {p.tile}/{p.stride}" if p.mode == "slide" else "") + f" × {p.num_views} TTA view(s)"
                     for p in protocols)
    return _verdict(name, agree, total, worst, f"{len(masks)} image(s) through {what}",
                    "the inference path misplaces windows or TTA views: each window's and each flipped/scaled "
                    "view's logits must go back to the pixels they came from")


def _verdict(name: str, agree: int, total: int, worst: float, what: str, fix: str) -> CheckResult:
    if total == 0:
        return failed(name, "0 px compared", f"{what}: no interior pixel to compare",
                      "use masks with regions larger than 3×3 pixels")
    share = agree / total
    figure = f"{100 * share:.2f}% of {total} px agree (worst {100 * worst:.1f}%)"
    details = {"agreeing": agree, "compared": total, "worst_image": worst, "min_agreement": MIN_AGREEMENT}
    if worst < MIN_AGREEMENT:
        return failed(name, figure, f"{what}: decoded colours disagree with the masks", fix, **details)
    return passed(name, figure, f"{what}: colours decode back to the masks", **details)
