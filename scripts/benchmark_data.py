"""Data-pipeline throughput: per worker process, full augmentation chain vs plain decode-and-crop.

    python scripts/benchmark_data.py                       # 1024² tiles, 768 crops, all backends
    python scripts/benchmark_data.py --backends albumentations --rounds 5 --output bench.json

Generates (once) a LoveDA-format tree of 1024×1024 PNG tiles, then times, in this one process with
one thread (what one DataLoader worker has), images/s of:

- ``decode``: reading the PNG image and mask only;
- ``decode+crop``: the plain pipeline (random crop + flip + normalisation), the baseline;
- ``full/<backend>``: decode + the full chain (random rescale 0.5–2, pad, crop, rotation ±15° with
  p=0.5, h/v flips, 90° rotations, colour jitter, normalisation) with each candidate backend:
  ``albumentations`` (what :class:`~mapsage_ds.data.transforms.TrainTransform` uses),
  ``torchvision`` (torchvision.transforms.v2 functional ops on uint8 tensors, our own draws) and
  ``kornia`` (kornia functional ops on float tensors, our own draws);
- ``collate`` and ``collate+mix``: stacking a batch of 8 crops, plain and with CutMix/MixUp
  (probability 0.5 each), reported per image.

Pipelines are timed in interleaved rounds and the median round is reported. The main figure is
images per CPU-second of this process (what a worker with a core of its own delivers; on a busy
shared machine the wall clock also counts other processes' time), images per wall-second beside it.
Nothing here is asserted; the figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import default_collate

from mapsage_ds.data.classes import IGNORE_INDEX
from mapsage_ds.data.loaders import TransformedDataset
from mapsage_ds.data.loveda import LoveDA
from mapsage_ds.data.mixing import MixCollate
from mapsage_ds.data.synthetic import SyntheticSpec, ensure_synthetic_tree
from mapsage_ds.data.transforms import ColorJitter, Normalize, TrainTransform, random_crop
from mapsage_ds.errors import ConfigError

SCALE = (0.5, 2.0)
DEGREES = 15.0
JITTER = ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, prob=0.8)
BACKENDS = ("albumentations", "torchvision", "kornia")


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _coin(generator: torch.Generator, p: float) -> bool:
    return bool(torch.rand((), generator=generator) < p)


class TorchvisionChain:
    """The full chain with torchvision.transforms.v2 functional ops (uint8 tensors), our own draws."""

    def __init__(self, crop_size: int) -> None:
        import torchvision.transforms.v2.functional as TF

        self.TF, self.crop_size, self.normalize = TF, crop_size, Normalize()

    def __call__(self, sample: dict, generator: torch.Generator) -> dict:
        TF, image, mask = self.TF, sample["image"], sample["mask"]
        factor = _uniform(generator, *SCALE)
        size = [round(image.shape[-2] * factor), round(image.shape[-1] * factor)]
        image = TF.resize(image, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
        mask = TF.resize(mask[None], size, interpolation=TF.InterpolationMode.NEAREST)[0]
        image, mask = random_crop(image, mask, self.crop_size, generator)
        if _coin(generator, 0.5):
            angle = _uniform(generator, -DEGREES, DEGREES)
            image = TF.rotate(image, angle, interpolation=TF.InterpolationMode.BILINEAR, fill=[0.0])
            mask = TF.rotate(mask[None], angle, interpolation=TF.InterpolationMode.NEAREST, fill=[IGNORE_INDEX])[0]
        if _coin(generator, 0.5):
            image, mask = image.flip(-1), mask.flip(-1)
        if _coin(generator, 0.5):
            image, mask = image.flip(-2), mask.flip(-2)
        k = int(torch.randint(0, 4, (), generator=generator))
        image, mask = torch.rot90(image, k, (-2, -1)), torch.rot90(mask, k, (-2, -1))
        if _coin(generator, JITTER.prob):
            image = TF.adjust_brightness(image, _uniform(generator, 1 - JITTER.brightness, 1 + JITTER.brightness))
            image = TF.adjust_contrast(image, _uniform(generator, 1 - JITTER.contrast, 1 + JITTER.contrast))
            image = TF.adjust_saturation(image, _uniform(generator, 1 - JITTER.saturation, 1 + JITTER.saturation))
            image = TF.adjust_hue(image, _uniform(generator, -JITTER.hue, JITTER.hue))
        return {**sample, "image": self.normalize(image.contiguous()), "mask": mask.contiguous()}


class KorniaChain:
    """The full chain with kornia functional ops (float tensors in [0, 1]), our own draws."""

    def __init__(self, crop_size: int) -> None:
        try:
            import kornia
        except ImportError as error:
            raise ConfigError("the kornia backend needs kornia: pip install -e .[bench] (or drop it with "
                              "--backends albumentations,torchvision)") from error
        self.kornia, self.crop_size = kornia, crop_size
        mean, std = Normalize().mean, Normalize().std
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, sample: dict, generator: torch.Generator) -> dict:
        K = self.kornia
        image, mask = sample["image"][None].float() / 255.0, sample["mask"][None, None].float()
        factor = _uniform(generator, *SCALE)
        size = (round(image.shape[-2] * factor), round(image.shape[-1] * factor))
        image = K.geometry.transform.resize(image, size, interpolation="bilinear", antialias=False)
        mask = K.geometry.transform.resize(mask, size, interpolation="nearest")
        cropped, cropped_mask = random_crop(image[0], mask[0, 0], self.crop_size, generator)
        image, mask = cropped[None], cropped_mask[None, None]
        if _coin(generator, 0.5):
            angle = torch.tensor([_uniform(generator, -DEGREES, DEGREES)])
            image = K.geometry.transform.rotate(image, angle, mode="bilinear")
            # Rotate mask + 1 with zero padding: 0 afterwards marks pixels from outside the crop.
            shifted = K.geometry.transform.rotate(mask + 1.0, angle, mode="nearest")
            mask = torch.where(shifted == 0, torch.full_like(shifted, IGNORE_INDEX), shifted - 1.0)
        if _coin(generator, 0.5):
            image, mask = K.geometry.transform.hflip(image), K.geometry.transform.hflip(mask)
        if _coin(generator, 0.5):
            image, mask = K.geometry.transform.vflip(image), K.geometry.transform.vflip(mask)
        k = int(torch.randint(0, 4, (), generator=generator))
        image, mask = torch.rot90(image, k, (-2, -1)), torch.rot90(mask, k, (-2, -1))
        if _coin(generator, JITTER.prob):
            image = K.enhance.adjust_brightness(image, _uniform(generator, -JITTER.brightness, JITTER.brightness))
            image = K.enhance.adjust_contrast(image, _uniform(generator, 1 - JITTER.contrast, 1 + JITTER.contrast))
            saturation = _uniform(generator, 1 - JITTER.saturation, 1 + JITTER.saturation)
            image = K.enhance.adjust_saturation(image, saturation)
            image = K.enhance.adjust_hue(image, _uniform(generator, -JITTER.hue, JITTER.hue) * 2 * math.pi)
        image = (image - self.mean) / self.std
        return {**sample, "image": image[0].contiguous(), "mask": mask[0, 0].long().contiguous()}


def full_transform(backend: str, crop_size: int) -> Callable[[dict, torch.Generator], dict]:
    """The full augmentation chain of ``backend``."""
    if backend == "albumentations":
        return TrainTransform(crop_size=crop_size, hflip=True, scale_range=SCALE, vflip=True, rot90=True,
                              rotate_degrees=DEGREES, rotate_prob=0.5, color_jitter=JITTER)
    if backend == "torchvision":
        return TorchvisionChain(crop_size)
    if backend == "kornia":
        return KorniaChain(crop_size)
    raise ConfigError(f"--backends: unknown backend {backend!r}; expected some of {', '.join(BACKENDS)}")


def time_round(run: Callable[[int], object], count: int) -> tuple[float, float]:
    """Calls per wall-clock second and per CPU second of this process, of ``run(i)`` over ``count`` items.

    CPU seconds are what a worker with a core of its own would take: on a shared machine the wall
    clock also counts the time other processes held the core.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(count):
        run(i)
    return count / (time.perf_counter() - wall), count / (time.process_time() - cpu)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns ``{pipeline: images/s}`` (median over rounds) plus the setup."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/bench_loveda_1024", help="where the generated tile tree lives")
    parser.add_argument("--size", type=int, default=1024, help="tile side in pixels")
    parser.add_argument("--tiles", type=int, default=6, help="training tiles per scene (Urban, Rural)")
    parser.add_argument("--crop", type=int, default=768, help="crop side")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median reported)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated full-chain backends")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    import cv2

    threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)  # a DataLoader worker runs its transforms on one thread
    cv2.setNumThreads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads[0])
        cv2.setNumThreads(threads[1])


def _run(args: argparse.Namespace) -> dict:
    spec = SyntheticSpec(size=args.size, train_per_scene=args.tiles, val_per_scene=1, test_per_scene=1,
                         nodata_fraction=0.3, seed=0)
    dataset = LoveDA(ensure_synthetic_tree(args.root, spec), "Train")
    count = len(dataset)
    pipelines: dict[str, Callable[[int], object]] = {"decode": dataset.__getitem__}
    baseline = TransformedDataset(dataset, TrainTransform(crop_size=args.crop), seed=0)
    pipelines["decode+crop"] = baseline.__getitem__
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        transformed = TransformedDataset(dataset, full_transform(backend, args.crop), seed=0)
        pipelines[f"full/{backend}"] = transformed.__getitem__

    crops = [baseline[i] for i in range(min(count, 8))]
    mix = MixCollate(mixup=0.5, cutmix=0.5)
    # One call collates (and mixes) a batch of len(crops) images.
    pipelines["collate"] = lambda i: default_collate(crops)
    pipelines["collate+mix"] = lambda i: mix(crops)

    for run in pipelines.values():  # warm-up: imports, caches, first-call allocations
        run(0)
    wall: dict[str, list[float]] = {name: [] for name in pipelines}
    cpu: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(args.rounds):
        for name, run in pipelines.items():
            per_wall, per_cpu = time_round(run, count)
            wall[name].append(per_wall)
            cpu[name].append(per_cpu)
    images_per_call = {"collate": len(crops), "collate+mix": len(crops)}
    results = {name: statistics.median(values) * images_per_call.get(name, 1) for name, values in cpu.items()}
    results_wall = {name: statistics.median(values) * images_per_call.get(name, 1) for name, values in wall.items()}
    setup = {"tiles": count, "tile_size": args.size, "crop": args.crop, "rounds": args.rounds, "threads": 1}
    print(f"{count} tiles of {args.size}², crop {args.crop}, 1 thread, median of {args.rounds} rounds")
    print(f"{'pipeline':<22}{'img/CPU-s':>10}{'ms CPU/img':>11}{'vs baseline':>12}{'img/wall-s':>11}")
    for name, rate in results.items():
        print(f"{name:<22}{rate:>10.1f}{1000 / rate:>11.1f}{rate / results['decode+crop']:>11.2f}x"
              f"{results_wall[name]:>11.1f}")
    report = {"setup": setup, "images_per_s": results, "images_per_wall_s": results_wall}
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
