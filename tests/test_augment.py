"""Augmentations: image and mask stay aligned through every geometric step and CutMix; draws are seeded."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from mapsage_ds.data.classes import IGNORE_INDEX
from mapsage_ds.data.loaders import TransformedDataset
from mapsage_ds.data.mixing import MixCollate, batch_generator, cutmix, mixup
from mapsage_ds.data.transforms import ColorJitter, Normalize, TrainTransform

# A colour per class, far apart, so a pixel's colour tells its class.
PALETTE = torch.tensor([[230, 25, 25], [25, 230, 25], [25, 25, 230], [230, 230, 25], [230, 25, 230],
                        [25, 230, 230], [128, 128, 128]], dtype=torch.uint8)
NORMALIZE = Normalize()


def coded_sample(seed: int, size: int = 64, block: int = 8) -> dict:
    """Blocky random labels with an ignored strip; each pixel's colour encodes its label."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, len(PALETTE), (size // block, size // block), generator=gen)
    mask = coarse.repeat_interleave(block, 0).repeat_interleave(block, 1)
    mask[:, : size // 8] = IGNORE_INDEX
    image = PALETTE[torch.where(mask == IGNORE_INDEX, 0, mask)].permute(2, 0, 1).contiguous()
    image[:, mask == IGNORE_INDEX] = 0
    return {"image": image, "mask": mask, "name": f"s{seed}"}


def decode(normalized: torch.Tensor) -> torch.Tensor:
    """Class of every pixel from its colour: nearest palette entry after undoing the normalisation."""
    mean = torch.tensor(NORMALIZE.mean).view(3, 1, 1) * 255
    std = torch.tensor(NORMALIZE.std).view(3, 1, 1) * 255
    rgb = normalized * std + mean
    distance = ((rgb.unsqueeze(0) - PALETTE.float().view(-1, 3, 1, 1)) ** 2).sum(1)
    return distance.argmin(0)


def assert_aligned(image: torch.Tensor, mask: torch.Tensor) -> None:
    valid = mask != IGNORE_INDEX
    assert valid.sum() > 0
    decoded = decode(image)
    assert torch.equal(decoded[valid], mask[valid]), f"{int((decoded[valid] != mask[valid]).sum())} pixels misaligned"


GEOMETRIC = {
    "crop": {},
    "rescale": {"scale_range": (0.5, 2.0)},
    "rotate": {"rotate_degrees": 30.0, "rotate_prob": 1.0},
    "hflip": {"hflip": True},
    "vflip": {"vflip": True},
    "rot90": {"rot90": True},
    "all": {"scale_range": (0.5, 2.0), "rotate_degrees": 15.0, "rotate_prob": 1.0, "vflip": True, "rot90": True},
}


@pytest.mark.parametrize("name", list(GEOMETRIC))
def test_every_geometric_augmentation_keeps_image_and_mask_aligned(name):
    kwargs = {"hflip": False, **GEOMETRIC[name]}
    transform = TrainTransform(crop_size=48, interpolation="nearest", **kwargs)
    outputs = []
    for seed in range(6):
        out = transform(coded_sample(seed), torch.Generator().manual_seed(seed))
        assert out["image"].shape == (3, 48, 48) and out["mask"].shape == (48, 48)
        assert out["mask"].dtype == torch.int64 and out["image"].dtype == torch.float32
        assert_aligned(out["image"], out["mask"])
        outputs.append(out)
    if name == "rotate":  # corners rotated in from outside the crop are ignored
        assert all((o["mask"][[0, 0, -1, -1], [0, -1, 0, -1]] == IGNORE_INDEX).any() for o in outputs)


def test_bilinear_resampling_keeps_alignment_away_from_class_edges():
    transform = TrainTransform(crop_size=48, **GEOMETRIC["all"])
    for seed in range(4):
        out = transform(coded_sample(seed, block=16), torch.Generator().manual_seed(seed))
        mask = out["mask"]
        # Pixels whose 5×5 neighbourhood holds one label only: resampling cannot blend colours there.
        padded = torch.nn.functional.pad(mask.float()[None, None], (2, 2, 2, 2), value=-1)
        windows = padded.unfold(2, 5, 1).unfold(3, 5, 1).reshape(48, 48, 25)
        interior = (windows == mask.float()[..., None]).all(-1) & (mask != IGNORE_INDEX)
        assert interior.sum() > 100
        assert torch.equal(decode(out["image"])[interior], mask[interior])


def test_cutmix_keeps_alignment_and_mixes():
    transform = TrainTransform(crop_size=48, hflip=True, interpolation="nearest", rot90=True)
    samples = [transform(coded_sample(i), torch.Generator().manual_seed(i)) for i in range(4)]
    batch = torch.utils.data.default_collate(samples)
    original = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
    mixed = cutmix(batch, np.random.default_rng(0), alpha=1.0)
    batch = original
    changed = 0
    for i in range(4):
        assert_aligned(mixed["image"][i], mixed["mask"][i])
        changed += int((mixed["mask"][i] != batch["mask"][i]).sum())
    assert changed > 0


def test_mixup_blends_images_and_keeps_both_masks():
    transform = TrainTransform(crop_size=32)
    batch = torch.utils.data.default_collate(
        [transform(coded_sample(i), torch.Generator().manual_seed(i)) for i in range(3)])
    mixed = mixup(batch, np.random.default_rng(1), alpha=0.4)
    lam = float(mixed["mix_lambda"])
    assert 0.0 <= lam <= 1.0
    partner = [2, 0, 1]
    torch.testing.assert_close(mixed["image"], lam * batch["image"] + (1 - lam) * batch["image"][partner],
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(mixed["mask"], batch["mask"]) and torch.equal(mixed["mask_mix"], batch["mask"][partner])


def test_mix_collate_is_a_function_of_the_samples_only():
    transform = TrainTransform(crop_size=32, vflip=True)
    collate = MixCollate(mixup=0.4, cutmix=0.4)
    kinds = collections.Counter()
    for start in range(0, 40, 2):
        samples = [transform(coded_sample(i), torch.Generator().manual_seed(i)) for i in (start, start + 1)]
        first, again = collate(samples), collate(samples)
        assert first.keys() == again.keys()
        for key in first:
            if isinstance(first[key], torch.Tensor):
                assert torch.equal(first[key], again[key])
        kinds["mixup" if "mask_mix" in first else
              "cutmix" if not torch.equal(first["mask"], torch.stack([s["mask"] for s in samples])) else "none"] += 1
    assert kinds["mixup"] > 0 and kinds["cutmix"] > 0 and kinds["none"] > 0
    rng_a = batch_generator(torch.tensor([1, 2])).random()
    assert rng_a == batch_generator(torch.tensor([1, 2])).random() != batch_generator(torch.tensor([2, 1])).random()


def test_draws_are_seeded_per_sample_and_independent_per_op():
    transform = TrainTransform(crop_size=40, vflip=True, rot90=True, rotate_degrees=10.0,
                               color_jitter=ColorJitter())
    data = TransformedDataset([coded_sample(0)] * 3, transform, seed=5)
    first, again = data[1], data[1]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["mask"], again["mask"])
    assert not torch.equal(data[2]["image"], first["image"])
    data.set_epoch(1)
    assert not torch.equal(data[1]["image"], first["image"])
    assert data[(1, 24)]["image"].shape == (3, 24, 24)  # a multi-scale key carries the batch's crop size

    # albumentations' own Compose.set_random_seed gives every op the same seed, which makes hflip and
    # vflip fire together; our per-op seeding must give all four combinations.
    flips = TrainTransform(crop_size=64, hflip=True, vflip=True, interpolation="nearest")
    base = coded_sample(3)
    combos = collections.Counter()
    for seed in range(120):
        mask = flips(base, torch.Generator().manual_seed(seed))["mask"]
        combos[(torch.equal(mask, base["mask"].flip(-1)) or torch.equal(mask, base["mask"].flip(-1, -2)),
                torch.equal(mask, base["mask"].flip(-2)) or torch.equal(mask, base["mask"].flip(-1, -2)))] += 1
    assert len(combos) == 4 and min(combos.values()) > 15


def test_colour_jitter_changes_colours_only():
    plain = TrainTransform(crop_size=64, hflip=False, scale_range=(1.0, 1.0), color_jitter=ColorJitter(prob=1.0))
    sample = coded_sample(2)
    out = plain(sample, torch.Generator().manual_seed(0))
    assert torch.equal(out["mask"], sample["mask"])
    assert not torch.allclose(out["image"], NORMALIZE(sample["image"]))


def test_plain_crop_and_flip_keep_the_original_implementation():
    # Only crop + hflip: the torch path of the walking skeleton, untouched (same draws, same output).
    from mapsage_ds.data.transforms import random_crop

    transform = TrainTransform(crop_size=32)
    assert transform.is_plain
    sample = coded_sample(4)
    out = transform(sample, torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(9)
    image, mask = random_crop(sample["image"], sample["mask"], 32, gen)
    if bool(torch.rand((), generator=gen) < 0.5):
        image, mask = image.flip(-1), mask.flip(-1)
    assert torch.equal(out["mask"], mask) and torch.equal(out["image"], NORMALIZE(image))


def test_benchmark_script_smoke(tmp_path):
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("benchmark_data", REPO / "scripts" / "benchmark_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    result = script.main(["--root", str(tmp_path / "tiles"), "--size", "64", "--tiles", "1", "--crop", "48",
                          "--rounds", "1", "--backends", "albumentations,torchvision",
                          "--output", str(tmp_path / "bench.json")])
    assert set(result["images_per_s"]) == {"decode", "decode+crop", "full/albumentations", "full/torchvision",
                                           "collate", "collate+mix"}
    assert all(rate > 0 for rate in result["images_per_s"].values())
    assert (tmp_path / "bench.json").is_file()
