"""SAM boundary refinement: seconds per tile for each SAM size, against the coarse prediction alone.

    python scripts/benchmark_refine.py                              # SegFormer b0, SAM ViT-B, 1024² tile
    python scripts/benchmark_refine.py --sam-sizes vit_b,vit_l,vit_h --repeats 3 --accelerator cuda

Baseline: the coarse prediction of one tile (``Predictor.probabilities``, the evaluation's whole-image
protocol) by a random SegFormer. Measured: the same plus ``SamRefiner.refine`` on that tile, with the
evaluation's default refinement settings. SAM is built at each published size (Meta's ViT-B/L/H image
encoders, transformers' ``SamModel``) with random weights: speed does not depend on weight values. Every
repeat runs the baseline and then the measured path, interleaved in the same process, after one warm-up
of each; the figures are medians and their ratio to the baseline. The section between the markers in
--doc is replaced (or appended) with the table, naming the machine.

The tile is a generated LoveDA-format tile (:mod:`mapsage_ds.data.synthetic`; or a real one with
--data-root). A random SegFormer predicts noise, whose regions say nothing about the work a trained
model's map gives SAM, so the probabilities SAM refines stand in for a trained model's: the tile's own
ground truth, softened (the coarse prediction is still run, and timed, in every measured pass).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import SamConfig, SamModel

from mapsage_ds.data.classes import LOVEDA_CLASSES
from mapsage_ds.data.loveda import LoveDA
from mapsage_ds.data.synthetic import SyntheticSpec, generate_loveda_tree
from mapsage_ds.data.transforms import Normalize
from mapsage_ds.errors import ConfigError
from mapsage_ds.evaluation.predictor import Predictor
from mapsage_ds.evaluation.protocol import EvalProtocol
from mapsage_ds.evaluation.refine import SamRefiner, find_regions
from mapsage_ds.files import replace_marked_section
from mapsage_ds.models.convert.sam import (
    DECODER_LAYER_NORM_EPS,
    PUBLISHED_DECODER_HEADS,
    PUBLISHED_GLOBAL_ATTN_INDEXES,
    PUBLISHED_HEADS,
    PUBLISHED_WINDOW_SIZE,
    VISION_LAYER_NORM_EPS,
    sam_processor,
)
from mapsage_ds.models.segformer import build_segformer
from mapsage_ds.runtime.accelerator import describe_machine, detect_accelerator, synchronize
from mapsage_ds.tasks import SegmentationTask

REPO = Path(__file__).resolve().parents[1]
IGNORE_INDEX = 255
# Meta's published image encoders: (width, depth); heads and global-attention blocks follow from them.
PUBLISHED_SAM = {"vit_b": (768, 12), "vit_l": (1024, 24), "vit_h": (1280, 32)}
# A tiny SAM (64 px input) for smoke tests of this script; not a published size.
TEST_SAM = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "global_attn_indexes": [1],
            "window_size": 4, "image_size": 64, "patch_size": 8, "output_channels": 16, "mlp_dim": 32,
            "num_pos_feats": 8}
SAM_SIZES = (*PUBLISHED_SAM, "test")


def sam_config(size: str) -> SamConfig:
    """The ``SamConfig`` of a published SAM (``vit_b``, ``vit_l``, ``vit_h``), as ``load_sam`` builds it from
    Meta's file, or of the tiny ``test`` SAM.

    Raises:
        ConfigError: If ``size`` is none of :data:`SAM_SIZES`.
    """
    if size == "test":
        vision = dict(TEST_SAM)
        prompt = {"hidden_size": 16, "mask_input_channels": 4}
        decoder = {"hidden_size": 16, "mlp_dim": 32, "num_attention_heads": 2, "iou_head_hidden_dim": 16}
    elif size in PUBLISHED_SAM:
        width, depth = PUBLISHED_SAM[size]
        vision = {"hidden_size": width, "num_hidden_layers": depth, "num_attention_heads": PUBLISHED_HEADS[width],
                  "global_attn_indexes": list(PUBLISHED_GLOBAL_ATTN_INDEXES[depth]),
                  "window_size": PUBLISHED_WINDOW_SIZE, "image_size": 1024, "patch_size": 16, "output_channels": 256,
                  "mlp_dim": 4 * width, "num_pos_feats": 128}
        prompt = {"hidden_size": 256, "mask_input_channels": 16}
        decoder = {"hidden_size": 256, "mlp_dim": 2048, "num_attention_heads": PUBLISHED_DECODER_HEADS,
                   "iou_head_hidden_dim": 256}
    else:
        raise ConfigError(f"--sam-sizes {size!r}: expected one of {', '.join(SAM_SIZES)}")
    vision["layer_norm_eps"] = VISION_LAYER_NORM_EPS
    prompt.update(image_size=vision["image_size"], patch_size=vision["patch_size"],
                  layer_norm_eps=VISION_LAYER_NORM_EPS)
    decoder["layer_norm_eps"] = DECODER_LAYER_NORM_EPS
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


@torch.no_grad()
def trained_like_weights_(model: SamModel) -> SamModel:
    """Random weights of a trained network's scale, in place.

    transformers initialises SAM's image encoder with std 1e-10 and zero LayerNorm gains: activations that
    small can run into subnormal floats, which x86 CPUs compute many times slower, and no real checkpoint
    is like that. Here every LayerNorm gain is about 1, every other tensor N(0, 0.02), and the prompt
    encoder's random Fourier matrix N(0, 1), as Meta initialises it.
    """
    gains = {id(module.weight) for module in model.modules() if isinstance(module, nn.LayerNorm)}
    for name, param in model.named_parameters():
        if name == "shared_image_embedding.positional_embedding":
            param.normal_(0.0, 1.0)
        elif id(param) in gains:
            param.normal_(1.0, 0.1)
        else:
            param.normal_(0.0, 0.02)
    return model


def stand_in_probabilities(mask: torch.Tensor, num_classes: int, *, peak: float = 0.8) -> torch.Tensor:
    """Class probabilities ``[C, H, W]`` whose argmax is ``mask`` (ignored pixels: class 0): a trained model's map.

    The true class gets ``peak``, every other class an equal share of the rest.
    """
    labels = torch.where(mask == IGNORE_INDEX, 0, mask)
    rest = (1.0 - peak) / (num_classes - 1)
    probabilities = torch.full((num_classes, *mask.shape), rest)
    probabilities.scatter_(0, labels.unsqueeze(0), peak)
    return probabilities


def load_tile(*, data_root: str | None, scene: str, index: int, size: int, seed: int) -> dict:
    """``{"image": uint8[3, H, W], "mask": int64[H, W], "name"}``: a LoveDA Val tile, generated unless ``data_root``."""
    if data_root is not None:
        dataset = LoveDA(data_root, "Val", scenes=scene)
        if not 0 <= index < len(dataset):
            raise ConfigError(f"--index {index}: {data_root} Val/{scene} has {len(dataset)} tiles")
        return dataset[index]
    with tempfile.TemporaryDirectory(prefix="refine-benchmark-") as root:
        spec = SyntheticSpec(size=size, train_per_scene=1, val_per_scene=index + 1, test_per_scene=1,
                             nodata_fraction=0.0, seed=seed)
        generate_loveda_tree(root, spec)
        return LoveDA(root, "Val", scenes=scene)[index]


def _timed(function, device: torch.device):
    synchronize(device)
    started = time.perf_counter()
    out = function()
    synchronize(device)
    return time.perf_counter() - started, out


def measure(predictor: Predictor, refiner: SamRefiner, image: torch.Tensor, probabilities: torch.Tensor,
            valid: torch.Tensor, *, repeats: int, device: torch.device) -> dict:
    """Median seconds of the coarse prediction alone, and of coarse + refinement, interleaved after a warm-up."""
    def coarse():
        return predictor.probabilities(image)

    def refine():
        return refiner.refine(image, probabilities, valid=valid)

    coarse()  # warm-up of both paths
    refine()
    baseline, measured_coarse, measured_refine = [], [], []
    for _ in range(repeats):
        baseline.append(_timed(coarse, device)[0])
        measured_coarse.append(_timed(coarse, device)[0])
        measured_refine.append(_timed(refine, device)[0])
    total = [c + r for c, r in zip(measured_coarse, measured_refine)]
    coarse_s, refine_s, total_s = (statistics.median(times) for times in (baseline, measured_refine, total))
    return {"coarse_s": coarse_s, "refine_s": refine_s, "total_s": total_s, "refine_ratio": refine_s / coarse_s,
            "total_ratio": total_s / coarse_s, "refine_times": measured_refine}


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark, print the table, write it into ``--doc``; returns one record per SAM size."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sam-sizes", default="vit_b", help=f"comma list of {', '.join(SAM_SIZES)}")
    parser.add_argument("--model-size", default="b0", help="coarse SegFormer size (random weights: speed only)")
    parser.add_argument("--image-size", type=int, default=1024, help="side of the generated tile")
    parser.add_argument("--scene", default="urban", choices=["urban", "rural"], help="scene of the tile")
    parser.add_argument("--data-root", default=None, help="LoveDA tree to take the Val tile from (default: generated)")
    parser.add_argument("--index", type=int, default=0, help="which Val tile of the scene")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated tile and of the random weights")
    parser.add_argument("--sam-min-area", type=int, default=64, help="smallest region prompted (pixels)")
    parser.add_argument("--sam-max-regions", type=int, default=32, help="regions prompted per tile")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads")
    parser.add_argument("--accelerator", default=None)
    parser.add_argument("--machine", default=None, help="machine description (default: detected)")
    parser.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"), help="markdown file to update")
    args = parser.parse_args(argv)
    sizes = [s.strip() for s in args.sam_sizes.split(",") if s.strip()]
    if not sizes:
        raise ConfigError("--sam-sizes: expected at least one SAM size")
    configs = {size: sam_config(size) for size in sizes}  # unknown sizes fail before any work
    if args.repeats < 1 or args.threads < 1:
        raise ConfigError(f"--repeats {args.repeats}, --threads {args.threads}: expected values >= 1")
    device = torch.device(detect_accelerator(args.accelerator))
    machine = args.machine or describe_machine(device)

    tile = load_tile(data_root=args.data_root, scene=args.scene, index=args.index, size=args.image_size,
                     seed=args.seed)
    image = tile["image"].unsqueeze(0).to(device)
    mask = tile["mask"]
    probabilities = stand_in_probabilities(mask, len(LOVEDA_CLASSES)).unsqueeze(0).to(device)
    valid = (mask != IGNORE_INDEX).unsqueeze(0).to(device)
    regions_found = len(find_regions(mask.masked_fill(mask == IGNORE_INDEX, 0).numpy(),
                                     num_classes=len(LOVEDA_CLASSES), min_area=args.sam_min_area,
                                     max_regions=np.iinfo(np.int32).max))
    prompted = min(regions_found, args.sam_max_regions)

    torch.manual_seed(args.seed)
    task = SegmentationTask(build_segformer(args.model_size, list(LOVEDA_CLASSES))).to(device).eval()
    predictor = Predictor(task.predict, normalize=Normalize(), protocol=EvalProtocol(), module=task)
    records = []
    load_before, threads_before = _load(), torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        for size, config in configs.items():
            torch.manual_seed(args.seed)
            model = trained_like_weights_(SamModel(config)).to(device).eval()
            refiner = SamRefiner(model, sam_processor(config.vision_config.image_size), device=device,
                                 min_region_area=args.sam_min_area, max_regions=args.sam_max_regions)
            record = {"sam": size, "parameters": sum(p.numel() for p in model.parameters()),
                      "regions_found": regions_found, "regions_prompted": prompted,
                      **measure(predictor, refiner, image, probabilities, valid, repeats=args.repeats, device=device)}
            records.append(record)
            print(f"SAM {size} ({record['parameters'] / 1e6:.1f} M): {prompted} of {regions_found} regions prompted; "
                  f"coarse {record['coarse_s']:.3f} s, refinement {record['refine_s']:.3f} s "
                  f"(x{record['refine_ratio']:.1f} the coarse prediction), coarse + refinement "
                  f"{record['total_s']:.3f} s (x{record['total_ratio']:.1f})", flush=True)
            del refiner, model
    finally:
        torch.set_num_threads(threads_before)

    height, width = image.shape[-2:]
    source = (f"Val/{args.scene} tile {args.index} of {args.data_root}" if args.data_root else
              f"a generated LoveDA-format {args.scene} tile (`mapsage_ds.data.synthetic`, seed {args.seed})")
    published = [size for size in sizes if size in PUBLISHED_SAM]
    architecture = ("SAM is Meta's published architecture of each size (ViT image encoder at 1024² input, window "
                    f"{PUBLISHED_WINDOW_SIZE}, as `load_sam` builds it from `sam_vit_{{b,l,h}}_*.pth`)" if published
                    else "SAM is a tiny test model (not a published size)")
    lines = [
        "## SAM refinement: seconds per tile against the coarse prediction",
        "",
        f"Machine: {machine} (device `{device.type}`, torch {torch.__version__}, {args.threads} intra-op "
        f"thread(s)). Produced by `python scripts/benchmark_refine.py --sam-sizes {args.sam_sizes} --model-size "
        f"{args.model_size} --image-size {args.image_size} --scene {args.scene} --seed {args.seed} "
        f"--repeats {args.repeats} --threads {args.threads}`.",
        "",
        f"One {height}×{width} tile: {source}. Baseline: its coarse prediction by a random SegFormer "
        f"`{args.model_size}` through the evaluation's `Predictor` (whole image, no TTA). Measured: the same "
        f"plus `SamRefiner.refine` (regions of at least {args.sam_min_area} px, at most {args.sam_max_regions}; "
        "`evaluate` defaults to 64 and 32; its thresholds decide which pixels change, not how much work SAM does). "
        f"{architecture}, with random weights: speed does not depend on weight values. SAM refines the tile's "
        "ground truth, softened, standing in for a trained model's map (a random SegFormer's map is noise): "
        f"{regions_found} connected regions of at least {args.sam_min_area} px, {prompted} prompted (box + "
        "point each, one batch). Each repeat runs the baseline and then the measured path, interleaved, after "
        f"a warm-up of both; times are medians of {args.repeats}. 1-minute load average {load_before:.1f} "
        f"before and {_load():.1f} after the run: the machine is shared, so absolute times are noisy and "
        "the ratios, measured side by side, are the figures to read.",
        "",
        "| SAM | parameters | regions prompted | coarse (s) | refinement (s) | refinement / coarse "
        "| coarse + refinement (s) | × coarse alone |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(f"| {r['sam']} | {r['parameters'] / 1e6:.1f} M | {r['regions_prompted']} | {r['coarse_s']:.3f} | "
                     f"{r['refine_s']:.3f} | ×{r['refine_ratio']:.1f} | {r['total_s']:.3f} | ×{r['total_ratio']:.1f} |")
    replace_marked_section(args.doc, "refine-benchmark", "\n".join(lines) + "\n")
    return records


if __name__ == "__main__":
    main()
