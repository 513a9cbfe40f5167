"""Each health check PASSes on a good input and FAILs on the input broken for it (real files, real models)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import DINOv3ViTModel

from conftest import WORLD_VARIABLES
from mapsage_ds.builders import build_task_loss, build_train_transform
from mapsage_ds.config import load_config
from mapsage_ds.data import LOVEDA_CLASSES, LOVEDA_PALETTE, LoveDA, write_loveda_sample
from mapsage_ds.data.loveda import read_mask_file
from mapsage_ds.data.mixing import cutmix
from mapsage_ds.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize, random_crop
from mapsage_ds.errors import DataError
from mapsage_ds.evaluation.loop import run_evaluation
from mapsage_ds.evaluation.metrics import ConfusionMatrix
from mapsage_ds.evaluation.predictor import Predictor
from mapsage_ds.evaluation.protocol import EvalProtocol
from mapsage_ds.health import (
    HealthOptions,
    Status,
    alignment,
    consistency,
    eval_outputs,
    labels,
    metric,
    normalisation,
    overfit,
    preflight,
)
from mapsage_ds.health import splits as split_checks
from mapsage_ds.losses import build_loss
from mapsage_ds.models import build_model
from mapsage_ds.models.dinov3 import dinov3_config
from mapsage_ds.optim import build_param_groups
from mapsage_ds.runtime.accelerator import setup_distributed, teardown_distributed
from mapsage_ds.runtime.engine import fill_ds_config, read_ds_config
from mapsage_ds.tasks import SegmentationTask

CLASSES = list(LOVEDA_CLASSES)


@pytest.fixture(scope="module")
def ctx():
    """This process as a world of one on the CPU (the overfit and collectives need a process group)."""
    saved = {key: os.environ.pop(key) for key in WORLD_VARIABLES if key in os.environ}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: one thread each is faster than contention
    started = not dist.is_initialized()
    context = setup_distributed("cpu")
    yield context
    torch.set_num_threads(threads)
    if started and dist.is_initialized():
        teardown_distributed()
    for key in WORLD_VARIABLES:
        os.environ.pop(key, None)
    os.environ.update(saved)


@pytest.fixture
def tree_copy(tiny_tree, tmp_path) -> Path:
    """A private copy of the tiny tree to break."""
    return Path(shutil.copytree(tiny_tree, tmp_path / "tree"))


def train_masks(tree: Path, count: int = 2) -> list[torch.Tensor]:
    data = LoveDA(tree, "Train")
    return [data[i]["mask"] for i in range(count)]


# ----------------------------------------------------------------------------------------------
# Pre-flight


def test_devices_pass_on_this_cpu_and_fail_when_ranks_share_a_card(ctx):
    report = preflight.probe_device(ctx, dtypes=[torch.float32, torch.bfloat16], size=64)
    assert report["matmul"]["float32"]["relative_error"] < 1e-6
    assert preflight.check_devices([report], expected_type="cpu").status is Status.PASS
    assert preflight.check_devices([report], expected_type="gcu").status is Status.FAIL
    # Two ranks bound to card 0 of one host: the predecessor's bug.
    shared = [{**report, "rank": r, "device_type": "gcu", "device_index": 0} for r in (0, 1)]
    result = preflight.check_devices(shared, expected_type="gcu")
    assert result.status is Status.FAIL and "share a card" in result.message


def test_collectives_are_checked_for_values_and_backend(ctx):
    observed = preflight.probe_collectives(ctx, size_bytes=4096)
    assert observed["all_reduce_ok"] and observed["all_gather_ok"] and observed["broadcast_ok"]
    assert preflight.check_collectives([observed], device_type="cpu").status is Status.WARN  # a world of one
    wrong = {**observed, "rank": 1, "all_reduce_ok": False}
    result = preflight.check_collectives([observed, wrong], device_type="cpu")
    assert result.status is Status.FAIL and "all_reduce gave wrong values on rank(s) [1]" in result.message
    assert preflight.check_collectives([observed, {**observed, "rank": 1}], device_type="gcu").status is Status.FAIL


def test_data_files_pass_on_a_good_tree_and_list_every_broken_file(tiny_tree, tree_copy):
    def scan(root):
        pairs = [p for split in ("Train", "Val", "Test") for p in preflight.list_pairs(root, split)]
        problems = [p for image, mask in pairs for p in preflight.scan_pair(image, mask, decode=True)]
        return preflight.check_data_files(problems, pairs=len(pairs), decoded=len(pairs), full=True,
                                          splits=("Train", "Val", "Test"))

    assert scan(tiny_tree).status is Status.PASS
    images = sorted((tree_copy / "Train" / "Urban" / "images_png").glob("*.png"))
    images[0].write_bytes(images[0].read_bytes()[:200])  # truncated
    (tree_copy / "Train" / "Urban" / "masks_png" / images[1].name).unlink()  # missing mask
    first_val = sorted((tree_copy / "Val" / "Rural" / "images_png").iterdir())[0].name
    Image.fromarray(np.ones((64, 64), np.uint8)).save(tree_copy / "Val" / "Rural" / "masks_png" / first_val)
    result = scan(tree_copy)
    assert result.status is Status.FAIL
    assert len(result.details["problems"]) == 3, result.details["problems"]


def test_checkpoint_keys_fail_when_backbone_keys_are_missing(tmp_path):
    model = build_model(arch="segformer", size="test", class_names=CLASSES).module
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    encoder_only = {k: v for k, v in state.items() if not k.startswith("decode_head.")}
    save_file(encoder_only, tmp_path / "encoder.safetensors")
    report, is_head = preflight.checkpoint_key_report(arch="segformer", size="test", class_names=CLASSES,
                                                      pretrained=str(tmp_path / "encoder.safetensors"))
    assert preflight.check_checkpoint_keys(report, is_head=is_head).status is Status.PASS

    dropped = [k for k in encoder_only if ".blocks.0." in k or ".block.0." in k][:2]
    assert dropped
    save_file({k: v for k, v in encoder_only.items() if k not in dropped}, tmp_path / "broken.safetensors")
    # A backbone missing tensors no longer loads at all (the runner turns the error into this check's FAIL);
    # the error names each missing tensor by its checkpoint name (block.0.0 for the in-memory stages.0.blocks.0).
    with pytest.raises(DataError) as info:
        preflight.checkpoint_key_report(arch="segformer", size="test", class_names=CLASSES,
                                        pretrained=str(tmp_path / "broken.safetensors"))
    message = str(info.value)
    assert "broken.safetensors" in message
    named = [name.strip() for name in message.split("missing ")[-1].split(",")]
    assert len(named) == len(dropped) and all(n.startswith("segformer.encoder.block.0.0.") for n in named), message


def test_checkpoint_keys_of_a_dinov3_backbone(tmp_path):
    backbone = DINOv3ViTModel._from_config(dinov3_config("test"))
    backbone.save_pretrained(tmp_path / "good")
    shutil.copytree(tmp_path / "good", tmp_path / "broken")
    weights = load_file(tmp_path / "broken" / "model.safetensors")
    dropped = sorted(k for k in weights if k.startswith("layer.1."))
    save_file({k: v for k, v in weights.items() if k not in dropped}, tmp_path / "broken" / "model.safetensors",
              metadata={"format": "pt"})
    def check(folder: str):
        report, is_head = preflight.checkpoint_key_report(arch="dinov3", size="test", class_names=CLASSES,
                                                          pretrained=str(tmp_path / folder))
        return preflight.check_checkpoint_keys(report, is_head=is_head)

    good, broken = check("good"), check("broken")
    assert good.status is Status.PASS
    assert broken.status is Status.FAIL and len(broken.details["missing_non_head"]) == len(dropped)


# ----------------------------------------------------------------------------------------------
# 1. Classes and ignore index


def test_label_agreement_fails_for_a_loss_ignoring_minus_one():
    model = build_model(arch="segformer", size="test", class_names=CLASSES).module
    metric_ = ConfusionMatrix(7, ignore_index=255)
    common = dict(class_names=CLASSES, dataset_ignore_index=255, model_num_classes=model.config.num_labels,
                  metric_num_classes=metric_.num_classes, metric_ignore_index=metric_.ignore_index)
    config = load_config(recipe="demo_full", overrides=["data.root=x"])
    good = labels.check_label_agreement(loss=build_task_loss(config.loss, num_classes=7), **common)
    assert good.status is Status.PASS and len(good.details["ignore_index"]) >= 5  # dataset, metric, 3+ loss parts
    bad = labels.check_label_agreement(loss=build_loss(ce=1.0, dice=0.5, ignore_index=-1), **common)
    assert bad.status is Status.FAIL and "ignores -1" in bad.message


@pytest.mark.parametrize("broken", ["value_9", "rgb_palette"])
def test_raw_masks_fail_on_value_9_and_on_palette_colours(tiny_tree, tree_copy, broken):
    good = labels.check_raw_masks(labels.inspect_raw_masks(sorted(tiny_tree.glob("*/*/masks_png/*.png"))))
    assert good.status is Status.PASS and good.details["values"] == list(range(8))
    raw = np.full((128, 128), 2, np.uint8)
    raw[:8] = 9 if broken == "value_9" else 1
    mask = raw if broken == "value_9" else np.asarray(LOVEDA_PALETTE, np.uint8)[raw - 1]
    write_loveda_sample(tree_copy, "Train", "Urban", "broken.png", np.zeros((128, 128, 3), np.uint8), mask)
    result = labels.check_raw_masks(labels.inspect_raw_masks(sorted(tree_copy.glob("*/*/masks_png/*.png"))))
    assert result.status is Status.FAIL and result.details["bad"] == 1
    assert ("outside 0..7" if broken == "value_9" else "2 LoveDA palette colours") in result.message


def test_nodata_mapping_passes_for_the_dataset_and_fails_when_nodata_becomes_class_0(tiny_tree):
    data = LoveDA(tiny_tree, "Train")
    raws = [read_mask_file(sample.mask) for sample in data.samples]
    good = labels.check_nodata_mapping((raw, data[i]["mask"].numpy()) for i, raw in enumerate(raws))
    assert good.status is Status.PASS and good.details["nodata_pixels"] > 0
    shifted = [(raw, np.clip(raw.astype(np.int64) - 1, 0, 6)) for raw in raws]  # no-data -> background
    bad = labels.check_nodata_mapping(shifted)
    assert bad.status is Status.FAIL and "became class(es) [0]" in bad.message


# ----------------------------------------------------------------------------------------------
# 2. Evaluation outputs


def test_evaluation_outputs_pass_for_the_evaluator_and_fail_for_a_mean_only_metric(tiny_tree, ctx):
    built = build_model(arch="segformer", size="test", class_names=CLASSES)
    task = SegmentationTask(built.module)
    predictor = Predictor(task.predict, normalize=built.normalize, module=task)
    metrics = run_evaluation(predictor, LoveDA(tiny_tree, "Val"), device=ctx.device, rank=0, world_size=1,
                             class_names=CLASSES, protocol=EvalProtocol(max_images=2, boundary_width=3)).metrics
    assert eval_outputs.check_evaluation_outputs(metrics, num_classes=7, band_pixels=3).status is Status.PASS
    wide = eval_outputs.band_width(boundary_width=None, dilation_ratio=0.02, height=1024, width=1024)
    assert eval_outputs.check_evaluation_outputs(metrics, num_classes=7, band_pixels=wide).status is Status.WARN
    confusion = ConfusionMatrix(7)
    confusion.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4, dtype=torch.long))
    no_boundary = eval_outputs.check_evaluation_outputs(confusion.compute(), num_classes=7, band_pixels=3)
    assert no_boundary.status is Status.FAIL and "boundary IoU" in no_boundary.message
    assert eval_outputs.check_evaluation_outputs({"miou": 0.5}, num_classes=7, band_pixels=3).status is Status.FAIL


# ----------------------------------------------------------------------------------------------
# 3. Normalisation and overfit


def test_normalisation_fails_for_imagenet_statistics_on_a_satellite_backbone(tmp_path):
    dinov3 = build_model(arch="dinov3", size="test", class_names=CLASSES)
    segformer = build_model(arch="segformer", size="test", class_names=CLASSES)
    assert normalisation.check_normalisation(arch="dinov3", pretrained=None,
                                             normalize=dinov3.normalize).status is Status.PASS
    assert normalisation.check_normalisation(arch="segformer", pretrained=None,
                                             normalize=segformer.normalize).status is Status.PASS
    bad = normalisation.check_normalisation(arch="dinov3", pretrained=None,
                                            normalize=Normalize(IMAGENET_MEAN, IMAGENET_STD))
    assert bad.status is Status.FAIL and bad.message.startswith("ImageNet statistics on a dinov3 backbone")
    # A checkpoint's own preprocessor_config.json wins over the architecture's default.
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": list(IMAGENET_MEAN),
                                                                   "image_std": list(IMAGENET_STD)}))
    assert normalisation.check_normalisation(arch="dinov3", pretrained=str(tmp_path),
                                             normalize=dinov3.normalize).status is Status.FAIL


@pytest.mark.parametrize("lr", [2e-2, 0.0])
def test_overfit_passes_through_deepspeed_and_fails_at_lr_0(tiny_tree, ctx, lr):
    torch.manual_seed(0)
    built = build_model(arch="segformer", size="test", class_names=CLASSES)
    batch = overfit.centre_crop_batch(LoveDA(tiny_tree, "Train"), [0], crop_size=64, normalize=built.normalize)
    ds_config = fill_ds_config(read_ds_config("zero2_fp32"), micro_batch_size=1, grad_accum_steps=1, world_size=1,
                               grad_clip=1.0)
    task = SegmentationTask(built.module, loss=build_loss(num_classes=7))
    trace = overfit.run_overfit(task, batch, param_groups=build_param_groups(task.named_parameters(), weight_decay=0.0),
                                ds_config=ds_config, lr=lr, steps=40, num_classes=7, device=ctx.device)
    result = overfit.check_overfit(trace, factor=2.0, miou_threshold=0.5, lr=lr)
    if lr > 0:
        assert result.status is Status.PASS, result.line()
    else:
        assert result.status is Status.FAIL and "the learning rate is 0" in result.fix
        assert max(trace.losses) - min(trace.losses) < 0.2 * trace.losses[0]


# ----------------------------------------------------------------------------------------------
# 4. Alignment


def test_train_alignment_passes_through_the_full_recipe_pipeline(tiny_tree):
    config = load_config(recipe="demo_full", overrides=[f"data.root={tiny_tree}"])
    transform = dataclasses.replace(build_train_transform(config.data, Normalize()), color_jitter=None)
    assert not transform.is_plain  # rescale, rotation, flips: the albumentations path
    rng = np.random.default_rng(0)
    result = alignment.check_train_alignment(
        transform, train_masks(tiny_tree), normalize=Normalize(), draws=3,
        collate=lambda samples: cutmix(torch.utils.data.default_collate(samples), rng, alpha=1.0))
    assert result.status is Status.PASS, result.line()


def test_train_alignment_fails_for_a_pipeline_that_flips_the_image_but_not_the_mask(tiny_tree):
    def flips_image_only(sample: dict, generator: torch.Generator) -> dict:
        image, mask = random_crop(sample["image"], sample["mask"], 96, generator)
        return {**sample, "image": Normalize()(image.flip(-1)), "mask": mask}

    result = alignment.check_train_alignment(flips_image_only, train_masks(tiny_tree), normalize=Normalize())
    assert result.status is Status.FAIL and result.details["worst_image"] < 0.9


class MisplacedWindows(Predictor):
    """A broken sliding window: every window's logits land one column of tiles too far right."""

    def _slide(self, x):
        return super()._slide(x).roll(shifts=self.protocol.stride, dims=-1)


def test_inference_alignment_through_slide_and_tta(tiny_tree):
    masks = train_masks(tiny_tree)
    protocols = [EvalProtocol(mode="slide", tile=48, stride=32, tta_scales=(0.75, 1.0, 1.25), tta_flip=("h", "v")),
                 EvalProtocol()]
    assert alignment.check_inference_alignment(protocols, masks, normalize=Normalize()).status is Status.PASS
    broken = alignment.check_inference_alignment(protocols[:1], masks, normalize=Normalize(),
                                                 predictor_class=MisplacedWindows)
    assert broken.status is Status.FAIL


# ----------------------------------------------------------------------------------------------
# 5. Splits


def test_split_folders_fail_when_validation_reads_another_folder(tiny_tree):
    counts = split_checks.count_split_images(tiny_tree)
    assert split_checks.check_split_folders(source="loveda", root=tiny_tree, train_split="Train", val_split="Val",
                                            counts=counts).status is Status.PASS
    assert split_checks.check_split_folders(source="loveda", root=tiny_tree, train_split="Train", val_split="Train",
                                            counts=counts).status is Status.FAIL


def test_split_leakage_finds_a_val_image_copied_into_train_and_a_reencoded_test_image(tiny_tree, tree_copy):
    def hashes(root, split):
        return split_checks.hash_files(split_checks.split_images(root, split))

    held_out = {"Val": hashes(tiny_tree, "Val"), "Test": hashes(tiny_tree, "Test")}
    assert split_checks.check_split_leakage(hashes(tiny_tree, "Train"), held_out).status is Status.PASS

    val_image = split_checks.split_images(tree_copy, "Val")[0]
    for folder in ("images_png", "masks_png"):
        shutil.copy(val_image.parent.parent / folder / val_image.name, tree_copy / "Train" / "Rural" / folder / "x.png")
    leaked = split_checks.check_split_leakage(hashes(tree_copy, "Train"), held_out)
    assert leaked.status is Status.FAIL and len(leaked.details["shared"]) == 1

    # A pretraining set (EarthVQA reuses LoveDA images) holding a test image saved with other PNG settings.
    extra = tmp = tree_copy.parent / "earthvqa"
    tmp.mkdir()
    test_image = split_checks.split_images(tiny_tree, "Test")[0]
    with Image.open(test_image) as image:
        image.save(extra / "a.png", compress_level=9)
    assert (extra / "a.png").read_bytes() != test_image.read_bytes()
    extra_result = split_checks.check_split_leakage(hashes(tiny_tree, "Train"), held_out,
                                                    extra_train=split_checks.hash_files(
                                                        split_checks.image_files_under(extra)))
    assert extra_result.status is Status.FAIL and extra_result.details["shared"][0]["split"] == "Test"


# ----------------------------------------------------------------------------------------------
# 6. Evaluation consistency


def test_evaluation_consistency_lists_differing_slide_settings(tmp_path):
    validation = EvalProtocol(mode="slide", tile=1024, stride=512, boundary_width=3)
    tracks = tmp_path / "tracks.yaml"
    tracks.write_text("evaluation: {split: Val, mode: slide, tile: 1024, stride: 512, boundary_width: 3}\n"
                      "tracks: []\n")
    final, source = consistency.read_final_eval(tracks)
    assert consistency.check_evaluation_consistency(validation, final, final_source=source).status is Status.PASS
    other = EvalProtocol(mode="slide", tile=512, stride=256, boundary_width=3)
    result = consistency.check_evaluation_consistency(validation, other, final_source="evaluate.py")
    assert result.status is Status.FAIL
    assert set(result.details["differences"]) == {"tile", "stride"}
    assert "tile: validation 1024 vs final 512" in result.message


# ----------------------------------------------------------------------------------------------
# 7. Metric correctness


def test_metric_passes_for_the_project_metric_and_fails_when_ignored_pixels_count():
    assert metric.check_metric(metric.project_metric).status is Status.PASS

    def counts_nodata_as_background(pred, target):
        confusion = ConfusionMatrix(7)
        confusion.update(pred, torch.where(target == 255, 0, target))
        return confusion.compute()

    result = metric.check_metric(counts_nodata_as_background)
    assert result.status is Status.FAIL and "ignored pixels change the scores" in result.message


def test_metric_known_answer_is_computed_independently():
    pred, target = metric.built_case()
    iou, miou = metric.reference_scores(pred, target, num_classes=7, ignore_index=255)
    # Class 6 is columns 14-15 (24 px), 8 of them ignored (rows 8-11): 16 valid. Rows 0-2 are predicted as
    # class 0 (6 missed); rows 0-2 of class 5 (columns 12-13) are predicted as 6 (6 false positives).
    assert iou[6] == pytest.approx(10 / (10 + 6 + 6))
    assert miou == pytest.approx(sum(iou) / 7)


def test_options_select_checks_by_group_and_name():
    options = HealthOptions(only=("preflight", "3.overfit"), skip=("preflight.collectives",))
    assert options.selects("preflight.devices") and options.selects("3.overfit")
    assert not options.selects("preflight.collectives") and not options.selects("3.normalisation")
    assert HealthOptions().selects("7.metric_correctness")
