"""Decode heads (``model.head``): shapes, the ViT neck, layer ids, ZeRO-3 construction, export round trips,
and UPerNet / the neck against mmsegmentation's own ``UPerHead`` and ``Feature2Pyramid``."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys

import pytest
import torch
from mit_reference import mmseg_source_packages, randomize_

from mapsage_ds.config import load_config
from mapsage_ds.data.classes import LOVEDA_CLASSES
from mapsage_ds.errors import ConfigError
from mapsage_ds.models.decode_heads import FeaturePyramidNeck, LinearHead, UPerHead, ViTUPerNetHead
from mapsage_ds.models.dinov3 import DINOv3Segmenter
from mapsage_ds.models.export import gather_full_state_dict, write_hf_export
from mapsage_ds.models.factory import build_model, load_exported
from mapsage_ds.models.segformer import SegformerWithHead
from mapsage_ds.optim.unfreeze import set_frozen
from mapsage_ds.runtime.engine import fill_ds_config, read_ds_config

CLASSES = list(LOVEDA_CLASSES)
# (arch, size, head, head_channels): every head each architecture takes, at its test size.
MODELS = [("dinov3", "test", "fusion", 16), ("dinov3", "test", "upernet", 16), ("dinov3", "test", "linear", None),
          ("segformer", "test", "auto", None), ("segformer", "test", "upernet", 16),
          ("segformer", "test", "linear", None)]
HEAD_PREFIXES = ("head.", "decode_head.")


def _build(arch: str, size: str, head: str, channels: int | None, **kwargs):
    return build_model(arch=arch, size=size, class_names=CLASSES, head=head, head_channels=channels,
                       drop_path_rate=0.0, **kwargs)


@pytest.mark.parametrize("arch,size,head,channels", MODELS)
def test_every_head_answers_at_a_quarter_of_odd_sized_inputs_and_trains(arch, size, head, channels):
    torch.manual_seed(0)
    module = _build(arch, size, head, channels).module
    image = torch.randn(2, 3, 72, 100)  # neither side a multiple of 16 or 32
    logits = module(pixel_values=image).logits
    assert logits.shape == (2, len(CLASSES), 18, 25)
    logits.square().mean().backward()
    head_grads = [p.grad for n, p in module.named_parameters() if n.startswith(HEAD_PREFIXES)]
    assert head_grads and all(g is not None and torch.isfinite(g).all() for g in head_grads)
    assert any(g.abs().sum() > 0 for g in head_grads)


def test_the_vit_neck_rescales_four_maps_to_4x_2x_1x_and_half():
    neck = FeaturePyramidNeck(8).eval()
    maps = [torch.randn(1, 8, 5, 7) for _ in range(4)]  # an 80×112 input's 1/16 grid
    out = neck(maps)
    assert [tuple(o.shape[-2:]) for o in out] == [(20, 28), (10, 14), (5, 7), (2, 3)]
    assert torch.equal(out[2], maps[2])
    assert torch.equal(out[3], torch.nn.functional.max_pool2d(maps[3], 2))


@pytest.mark.parametrize("arch,size,head,channels", MODELS)
def test_every_parameter_has_a_layer_id_and_a_frozen_backbone_leaves_only_the_head(arch, size, head, channels):
    built = _build(arch, size, head, channels)
    ids = {name: built.layer_id(name) for name, _ in built.module.named_parameters()}
    head_names = {n for n in ids if n.startswith(HEAD_PREFIXES)}
    assert head_names and all(ids[n] is None for n in head_names)  # None: the head, always at the full lr
    backbone = {n: i for n, i in ids.items() if n not in head_names}
    assert all(isinstance(i, int) and 0 <= i <= built.num_layers + 1 for i in backbone.values())
    assert {0, built.num_layers} <= set(backbone.values())
    # unfreeze.initial_frozen_fraction: 1.0 (the frozen-backbone recipes) leaves exactly the head trainable.
    frozen = set_frozen(built.module.named_parameters(), layer_id=built.layer_id, num_layers=built.num_layers,
                        fraction=1.0, model_prefix="")
    assert set(frozen) == set(backbone)
    assert {n for n, p in built.module.named_parameters() if p.requires_grad} == head_names


@pytest.mark.parametrize("arch,size,head,channels", [m for m in MODELS if m[2] != "auto"] + [MODELS[3]])
def test_export_then_load_exported_rebuilds_the_head_with_identical_logits(tmp_path, arch, size, head, channels):
    torch.manual_seed(1)
    module = randomize_(_build(arch, size, head, channels).module, seed=2).eval()
    for param in module.parameters():
        param.requires_grad_(False)  # no optimizer here: frozen tensors are read from the module
    state = gather_full_state_dict(module, stage=0)
    out = write_hf_export(module, state, tmp_path / "export", image_mean=(0.4, 0.4, 0.4), image_std=(0.2, 0.2, 0.2))
    loaded, normalize = load_exported(out)
    assert type(loaded) is type(module) and type(loaded.decode_head if arch == "segformer" else loaded.head) is type(
        module.decode_head if arch == "segformer" else module.head)
    image = torch.randn(1, 3, 72, 100)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(pixel_values=image).logits, module(pixel_values=image).logits)
    assert normalize.mean == (0.4, 0.4, 0.4)
    if arch == "dinov3":
        head_config = json.loads((out / "mapsage_head.json").read_text())
        assert head_config["head"] == head and head_config["feature_layers"] == module.feature_layers
    else:
        recorded = json.loads((out / "config.json").read_text()).get("mapsage_head")
        assert recorded == (None if head == "auto" else {"type": head, "channels": channels, "norm": "batch"})


def test_an_export_from_before_model_head_loads_its_fusion_head(tmp_path):
    module = randomize_(_build("dinov3", "test", "auto", None).module, seed=3).eval()
    for param in module.parameters():
        param.requires_grad_(False)
    out = write_hf_export(module, gather_full_state_dict(module, stage=0), tmp_path / "old",
                          image_mean=(0.5,) * 3, image_std=(0.2,) * 3)
    old = {k: v for k, v in json.loads((out / "mapsage_head.json").read_text()).items()
           if k not in ("head", "head_norm")}
    (out / "mapsage_head.json").write_text(json.dumps(old))
    loaded, _ = load_exported(out)
    assert loaded.head_type == "fusion" and loaded.head_channels == module.head_channels


def _zero3_config() -> dict:
    return fill_ds_config(read_ds_config("zero3_fp32"), micro_batch_size=1, grad_accum_steps=1, world_size=1,
                          grad_clip=1.0)


@pytest.mark.parametrize("arch", ["dinov3", "segformer"])
def test_zero3_builds_upernet_born_sharded_and_its_export_loads(tmp_path, one_process_world, arch):
    torch.manual_seed(4)
    built = _build(arch, "test", "upernet", 16, ds_config=_zero3_config())
    params = dict(built.module.named_parameters())
    assert any(n.startswith(HEAD_PREFIXES) for n in params)
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in params.values())  # head and neck too
    for param in params.values():
        param.requires_grad_(False)
    state = gather_full_state_dict(built.module, stage=3)
    assert all(state[n].shape == params[n].ds_shape for n in params)
    out = write_hf_export(built.module, state, tmp_path / "export", image_mean=(0.5,) * 3, image_std=(0.2,) * 3)
    loaded, _ = load_exported(out)
    loaded_state = loaded.state_dict()
    assert set(loaded_state) == set(state)
    assert all(torch.equal(loaded_state[n], state[n]) for n in state)


def test_head_choices_are_checked_against_the_architecture():
    with pytest.raises(ConfigError, match="model.head='fusion'.*segformer.*model.head=auto"):
        _build("segformer", "test", "fusion", None)
    with pytest.raises(ConfigError, match="model.head_channels=64"):
        _build("dinov3", "test", "linear", 64)
    with pytest.raises(ConfigError, match="model.head_channels=64"):
        _build("segformer", "test", "auto", 64)
    with pytest.raises(ConfigError, match="model.head_norm='layer'"):
        build_model(arch="dinov3", size="test", class_names=CLASSES, head="upernet", head_norm="layer")
    with pytest.raises(ConfigError, match="model.head='mask2former': expected one of auto, fusion, upernet, linear"):
        load_config(overrides=["model.head=mask2former", "data.root=/x"])
    with pytest.raises(ConfigError, match="model.head_norm=group"):
        load_config(overrides=["model.head=upernet", "train.micro_batch_size=1", "data.root=/x"])


def test_linear_probe_reads_the_last_layer_and_upernet_four_by_default():
    from mapsage_ds.models.dinov3 import dinov3_config

    config = dinov3_config("test")
    assert DINOv3Segmenter(config, num_classes=7, head="linear").feature_layers == [3]
    assert DINOv3Segmenter(config, num_classes=7, head="upernet").feature_layers == [0, 1, 2, 3]
    assert isinstance(DINOv3Segmenter(config, num_classes=7, head="linear").head, LinearHead)
    with pytest.raises(ConfigError, match="4 ViT layers"):
        DINOv3Segmenter(config, num_classes=7, head="upernet", feature_layers=[1, 3])


@pytest.mark.parametrize("name,size,frozen", [
    ("dinov3_web_vit7b_upernet_frozen_loveda", "vit7b16", 1.0),
    ("dinov3_sat_vit7b_upernet_frozen_loveda", "vit7b16", 1.0),
    ("dinov3_web_vitl_upernet_loveda", "vitl16", 0.0), ("dinov3_sat_vitl_upernet_loveda", "vitl16", 0.0),
])
def test_upernet_recipes_resolve(name, size, frozen):
    config = load_config(recipe=name, overrides=["data.root=/not/read"])
    assert (config.model.arch, config.model.size, config.model.head) == ("dinov3", size, "upernet")
    assert (config.data.crop_size, config.train.max_steps, config.optim.lr, config.optim.warmup_steps) == (
        512, 80000, 6e-5, 1500)
    assert config.train.micro_batch_size * config.train.grad_accum_steps == 1  # × 8 cards: batch 8
    assert (config.unfreeze.initial_frozen_fraction if config.unfreeze else 0.0) == frozen


# mmsegmentation 1.2.2 as the reference. Its package __init__ files import every model, some of them
# mmcv's compiled ops, which mmcv-lite lacks; UPerHead and Feature2Pyramid need none. So only their
# source files are imported, behind empty package entries that stay while this module's tests build
# the reference modules (mmengine's registry imports ``mmseg.models`` when the head builds its loss)
# and are taken out again afterwards, as tests/mit_reference.py does for the MiT backbone.
@pytest.fixture(scope="module")
def mmseg_classes():
    pytest.importorskip("mmseg")
    if importlib.util.find_spec("mmcv._ext") is not None:
        from mmseg.models.decode_heads import UPerHead as MMUPerHead
        from mmseg.models.necks import Feature2Pyramid

        yield MMUPerHead, Feature2Pyramid
        return
    from mmseg.registry import MODELS

    packages = ("mmseg.utils", "mmseg.models", "mmseg.models.utils", "mmseg.models.losses", "mmseg.models.decode_heads",
                "mmseg.models.necks")
    with mmseg_source_packages(packages):
        typing_utils = importlib.import_module("mmseg.utils.typing_utils")
        sys.modules["mmseg.utils"].__dict__.update({k: getattr(typing_utils, k) for k in ("ConfigType", "SampleList")})
        sys.modules["mmseg.models.utils"].resize = importlib.import_module("mmseg.models.utils.wrappers").resize
        sys.modules["mmseg.models.losses"].accuracy = importlib.import_module("mmseg.models.losses.accuracy").accuracy
        if "CrossEntropyLoss" not in MODELS.module_dict:  # the head's default loss; registered once per process
            importlib.import_module("mmseg.models.losses.cross_entropy_loss")
        yield (importlib.import_module("mmseg.models.decode_heads.uper_head").UPerHead,
               importlib.import_module("mmseg.models.necks.featurepyramid").Feature2Pyramid)


@pytest.mark.parametrize("norm,mm_norm", [("batch", {"type": "BN"}), ("group", {"type": "GN", "num_groups": 32})])
def test_upernet_and_its_neck_equal_mmsegmentation_given_the_same_weights(norm, mm_norm, mmseg_classes):
    mm_uper, mm_neck_class = mmseg_classes
    # 32 GroupNorm groups everywhere; two channels per group on the 1×1 pooled map, where one would have no variance.
    channels, width = 64, 32
    ours = ViTUPerNetHead(width, channels, len(CLASSES), norm=norm)
    randomize_(ours, seed=5).eval()
    mm_neck = mm_neck_class(width, rescales=[4, 2, 1, 0.5], norm_cfg={**mm_norm, "requires_grad": True}).eval()
    mm_head = mm_uper(in_channels=[width] * 4, in_index=[0, 1, 2, 3], channels=channels, num_classes=len(CLASSES),
                      norm_cfg={**mm_norm, "requires_grad": True}, align_corners=False, dropout_ratio=0.1).eval()
    mm_neck.load_state_dict(ours.neck.state_dict(), strict=True)  # same names: no mapping needed
    mm_head.load_state_dict(ours.decode.state_dict(), strict=True)
    maps = [torch.randn(2, width, 5, 7, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        neck_out = ours.neck(maps)
        mm_neck_out = mm_neck(maps)
        for a, b in zip(neck_out, mm_neck_out, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        logits = ours(maps)
        torch.testing.assert_close(logits, mm_head(list(mm_neck_out)), rtol=1e-5, atol=1e-5)
    assert logits.shape == (2, len(CLASSES), 20, 28)
    # UPerNet alone on a hierarchical pyramid (SegFormer's four stages) with unequal widths.
    pyramid = UPerHead([4, 8, 12, 16], channels, len(CLASSES), norm=norm)
    randomize_(pyramid, seed=6).eval()
    mm_pyramid = mm_uper(in_channels=[4, 8, 12, 16], in_index=[0, 1, 2, 3], channels=channels,
                         num_classes=len(CLASSES), norm_cfg={**mm_norm, "requires_grad": True},
                         align_corners=False).eval()
    mm_pyramid.load_state_dict(pyramid.state_dict(), strict=True)
    stages = [torch.randn(1, c, s, s + 3) for c, s in ((4, 18), (8, 9), (12, 5), (16, 3))]
    with torch.no_grad():
        torch.testing.assert_close(pyramid(stages), mm_pyramid(stages), rtol=1e-5, atol=1e-5)


def test_segformer_with_head_keeps_hf_names_and_is_rebuilt_from_its_config(tmp_path):
    built = _build("segformer", "test", "upernet", 16)
    module = built.module
    assert isinstance(module, SegformerWithHead) and isinstance(module.decode_head, UPerHead)
    module.save_pretrained(tmp_path / "plain")
    again = SegformerWithHead.from_pretrained(str(tmp_path / "plain"))
    assert isinstance(again.decode_head, UPerHead) and again.decode_head.conv_seg.in_channels == 16
