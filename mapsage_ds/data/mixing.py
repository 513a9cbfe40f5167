"""Batch-level mixing for segmentation: CutMix and MixUp, seeded from the batch's own samples.

Runs as the training loader's ``collate_fn``. Its randomness comes from the ``"seed"`` each
sample carries (drawn by :class:`~mapsage_ds.data.transforms.TrainTransform` from the sample's
generator, seeded by (run seed, epoch, index)), never from a global RNG, so a resumed run mixes
exactly as the uninterrupted one did, whatever the number of workers.

- CutMix pastes a random box of the partner's image *and mask* into each sample: labels stay
  exact, nothing changes downstream.
- MixUp blends the whole batch with its partners by one ``λ``; the mask cannot be blended, so
  the batch carries ``"mask_mix"`` (the partners' masks) and ``"mix_lambda"``, and the loss is
  ``λ · L(mask) + (1 − λ) · L(mask_mix)`` (:class:`~mapsage_ds.losses.CompositeLoss`).

The partner of sample ``i`` is sample ``i − 1`` (cyclically); batch order is already random.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import default_collate

from mapsage_ds.data.loaders import sample_seed


def batch_generator(seeds: torch.Tensor) -> np.random.Generator:
    """A generator seeded by all the per-sample seeds of a batch."""
    return np.random.default_rng(sample_seed(*seeds.tolist()))


def cutmix(batch: dict, rng: np.random.Generator, *, alpha: float) -> dict:
    """Paste a box of sample ``i − 1`` into sample ``i``, in image and mask alike, IN PLACE.

    The box covers a fraction ``1 − λ`` of the tile, ``λ ~ Beta(alpha, alpha)`` per sample, centred
    uniformly and clipped at the border. The batch's tensors are modified (a collate function owns
    them; copying a batch of 768² crops costs as much as the pasting).

    Shape:
        - batch["image"]: (N, 3, H, W); batch["mask"]: (N, H, W)
    """
    images, masks = batch["image"], batch["mask"]
    partner = torch.roll(torch.arange(images.shape[0]), 1).tolist()
    height, width = masks.shape[-2:]
    patches = []
    for i, j in enumerate(partner):  # read every source box before anything is overwritten
        cut = np.sqrt(1.0 - rng.beta(alpha, alpha))
        cy, cx = rng.integers(height), rng.integers(width)
        half_h, half_w = int(height * cut) // 2, int(width * cut) // 2
        box = (slice(max(cy - half_h, 0), min(cy + half_h, height)),
               slice(max(cx - half_w, 0), min(cx + half_w, width)))
        patches.append((i, box, images[j, :, box[0], box[1]].clone(), masks[j, box[0], box[1]].clone()))
    for i, box, image_patch, mask_patch in patches:
        images[i, :, box[0], box[1]] = image_patch
        masks[i, box[0], box[1]] = mask_patch
    return batch


def mixup(batch: dict, rng: np.random.Generator, *, alpha: float) -> dict:
    """Blend every image with sample ``i − 1``'s by one ``λ ~ Beta(alpha, alpha)``; keep both masks.

    Returns:
        The batch with blended ``"image"``, ``"mask_mix"`` (the partners' masks) and
        ``"mix_lambda"`` (a float32 scalar tensor, the weight of ``"mask"``).
    """
    lam = float(rng.beta(alpha, alpha))
    # lerp(partner, own, λ) = λ·own + (1 − λ)·partner in one pass; roll gives the partners.
    images = torch.lerp(batch["image"].roll(1, 0), batch["image"], lam)
    return {**batch, "image": images, "mask_mix": batch["mask"].roll(1, 0),
            "mix_lambda": torch.tensor(lam, dtype=torch.float32)}


@dataclass(frozen=True)
class MixCollate:
    """Collate a list of samples, then make the batch a MixUp or CutMix batch with these probabilities.

    A batch is MixUp with probability ``mixup``, else CutMix with probability ``cutmix``, else left
    as it is. Batches of one sample are never mixed.

    Attributes:
        mixup: Probability of a MixUp batch.
        cutmix: Probability of a CutMix batch.
        mixup_alpha: Beta parameter of MixUp's λ.
        cutmix_alpha: Beta parameter of CutMix's λ.
    """

    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_alpha: float = 0.4
    cutmix_alpha: float = 1.0

    def __call__(self, samples: list[dict]) -> dict:
        """The collated (and possibly mixed) batch."""
        batch = default_collate(samples)
        if "seed" not in batch:
            raise KeyError("MixCollate needs a per-sample 'seed' (TrainTransform provides one)")
        if len(samples) < 2:
            return batch
        rng = batch_generator(batch["seed"])
        draw = rng.random()
        if draw < self.mixup:
            return mixup(batch, rng, alpha=self.mixup_alpha)
        if draw < self.mixup + self.cutmix:
            return cutmix(batch, rng, alpha=self.cutmix_alpha)
        return batch
