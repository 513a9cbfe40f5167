"""SAM refinement: a tiny random SAM saved and loaded back end to end, and the replacement rule on a shifted mask."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_sam import save_tiny_sam

from mapsage_ds.data.transforms import Normalize
from mapsage_ds.errors import DataError, MissingFileError
from mapsage_ds.evaluation.loop import run_evaluation
from mapsage_ds.evaluation.predictor import Predictor
from mapsage_ds.evaluation.refine import SamRefiner, apply_region_masks, find_regions

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_sam_dir(tmp_path_factory):
    return save_tiny_sam(tmp_path_factory.mktemp("sam") / "tiny-sam")


def _probabilities(seed: int, shape=(2, 7, 48, 40)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.rand(shape, generator=generator)
    logits[:, 1, 10:30, 5:25] += 3.0
    logits[:, 4, 32:46, 20:38] += 3.0
    return logits.softmax(dim=1)


def test_tiny_sam_refines_end_to_end_and_never_touches_ignored_pixels(tiny_sam_dir):
    refiner = SamRefiner.from_pretrained(tiny_sam_dir, device=CPU, score_threshold=-1e9, confidence=0.9,
                                         min_region_area=4)
    images = torch.randint(0, 256, (2, 3, 48, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    probabilities = _probabilities(2)
    coarse = probabilities.argmax(dim=1)
    valid = torch.rand(2, 48, 40, generator=torch.Generator().manual_seed(3)) > 0.3

    refined = refiner.refine(images, probabilities, valid=valid)
    assert refined.shape == coarse.shape and refined.dtype == torch.int64
    assert (refined != coarse).any(), "the confident random SAM should change some pixels"
    assert torch.equal(refined[~valid], coarse[~valid])
    unguarded = refiner.refine(images, probabilities)
    assert (unguarded[~valid] != coarse[~valid]).any(), "without the guard those pixels would have changed"
    assert torch.equal(unguarded[valid], refined[valid])


def test_refinement_scores_before_and_after_in_evaluation(tiny_sam_dir):
    refiner = SamRefiner.from_pretrained(tiny_sam_dir, device=CPU, score_threshold=-1e9, min_region_area=4)
    generator = torch.Generator().manual_seed(4)
    net = torch.nn.Conv2d(3, 7, 3, padding=1).eval()
    items = [{"image": torch.randint(0, 256, (3, 40, 44), dtype=torch.uint8, generator=generator),
              "mask": torch.randint(0, 7, (40, 44), generator=generator), "name": f"{i}.png"} for i in range(2)]
    for item in items:
        item["mask"][:8] = 255
    predictor = Predictor(net, normalize=Normalize())
    refined = run_evaluation(predictor, items, device=CPU, rank=0, world_size=1,
                             class_names=[f"c{i}" for i in range(7)], refiner=refiner)
    plain = run_evaluation(predictor, items, device=CPU, rank=0, world_size=1, class_names=[f"c{i}" for i in range(7)])
    assert refined.before_refinement.confusion == plain.metrics.confusion
    assert refined.before_refinement.boundary_iou == pytest.approx(plain.metrics.boundary_iou, nan_ok=True)
    assert sum(map(sum, refined.metrics.confusion)) == sum(map(sum, plain.metrics.confusion))


def _shifted_square_case():
    """Ground truth: a class-3 square on class 0; the coarse prediction has it shifted by (4, 5) pixels."""
    truth = torch.zeros(48, 48, dtype=torch.int64)
    truth[10:30, 12:32] = 3
    coarse = torch.zeros(48, 48, dtype=torch.int64)
    coarse[14:34, 17:37] = 3
    probabilities = torch.full((7, 48, 48), 0.02)
    probabilities.scatter_(0, coarse[None], 0.88)
    regions = find_regions(coarse.numpy(), num_classes=7, min_area=4, max_regions=8)
    return truth, coarse, probabilities, regions


def _stand_in(regions, truth, inside: float, outside: float) -> torch.Tensor:
    """Stand-in SAM output: the true square for the class-3 region, an unsure 0.5 for the others."""
    masks = torch.full((len(regions), *truth.shape), 0.5)
    for index, region in enumerate(regions):
        if region.label == 3:
            masks[index] = torch.where(truth == 3, inside, outside)
    return masks


def _apply(coarse, probabilities, regions, mask_probabilities, scores, valid=None):
    return apply_region_masks(
        coarse, probabilities, region_labels=torch.tensor([r.label for r in regions]),
        region_masks=torch.from_numpy(np.stack([r.mask for r in regions])),
        region_boxes=torch.tensor([r.box for r in regions]), mask_probabilities=mask_probabilities,
        scores=scores, score_threshold=0.8, confidence=0.9, box_margin=0.25, valid=valid)


def test_replacement_rule_fixes_a_shifted_mask_where_confident():
    truth, coarse, probabilities, regions = _shifted_square_case()
    assert sorted(r.label for r in regions) == [0, 3]
    confident = _stand_in(regions, truth, inside=0.97, outside=0.02)
    scores = torch.full((len(regions),), 0.95)
    refined = _apply(coarse, probabilities, regions, confident, scores)
    assert torch.equal(refined, truth)

    # Unsure refiner (0.7 / 0.3), or a low predicted IoU: the coarse mask stays.
    unsure = _stand_in(regions, truth, inside=0.7, outside=0.3)
    assert torch.equal(_apply(coarse, probabilities, regions, unsure, scores), coarse)
    assert torch.equal(_apply(coarse, probabilities, regions, confident, torch.full_like(scores, 0.5)), coarse)

    # Invalid pixels keep their coarse label, the others are still fixed.
    valid = torch.ones(48, 48, dtype=torch.bool)
    valid[:, :20] = False
    guarded = _apply(coarse, probabilities, regions, confident, scores, valid=valid)
    assert torch.equal(guarded[:, :20], coarse[:, :20])
    assert torch.equal(guarded[:, 20:], truth[:, 20:])


def test_find_regions_gives_components_largest_first_with_prompts_inside():
    labels = np.zeros((30, 30), dtype=np.int64)
    labels[2:6, 2:6] = 1  # 16 px
    labels[10:20, 10:22] = 1  # 120 px, a separate component
    labels[25:28, 0:3] = 2  # 9 px
    regions = find_regions(labels, num_classes=3, min_area=10, max_regions=10)
    assert [(r.label, int(r.mask.sum())) for r in regions] == [(0, 30 * 30 - 16 - 120 - 9), (1, 120), (1, 16)]
    big = regions[1]
    assert big.box == (10, 10, 22, 20)
    x, y = big.point
    assert big.mask[y, x] and 13 <= y <= 16 and 13 <= x <= 18
    assert len(find_regions(labels, num_classes=3, min_area=1, max_regions=2)) == 2


def test_loading_errors_name_the_problem(tmp_path):
    with pytest.raises(MissingFileError, match="nope"):  # a directory or a Meta .pth; neither exists
        SamRefiner.from_pretrained(tmp_path / "nope", device=CPU)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "segformer"}))
    (tmp_path / "preprocessor_config.json").write_text("{}")
    with pytest.raises(MissingFileError, match="no weights"):
        SamRefiner.from_pretrained(tmp_path, device=CPU)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(DataError, match="model_type='segformer'"):
        SamRefiner.from_pretrained(tmp_path, device=CPU)
