"""DINOv3 adapter: presets on the meta device, padding, ZeRO-3 born-sharded construction, dry run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import deepspeed
import pytest
import torch

from conftest import REPO, subprocess_env
from mapsage_ds.data.classes import LOVEDA_CLASSES
from mapsage_ds.errors import DataError
from mapsage_ds.models.dinov3 import DINOv3Segmenter, default_feature_layers, dinov3_config
from mapsage_ds.models.export import write_hf_export
from mapsage_ds.models.factory import build_model
from mapsage_ds.optim import build_param_groups
from mapsage_ds.runtime.engine import fill_ds_config, read_ds_config

CLASSES = list(LOVEDA_CLASSES)


@pytest.mark.parametrize("preset,layers,dim,params_b", [("vitl16", 24, 1024, 0.30), ("vit7b16", 40, 4096, 6.7)])
def test_presets_match_the_published_backbones_on_the_meta_device(preset, layers, dim, params_b):
    config = dinov3_config(preset)
    assert (config.num_hidden_layers, config.hidden_size, config.patch_size, config.num_register_tokens) == (
        layers, dim, 16, 4)
    with torch.device("meta"):
        model = DINOv3Segmenter(config, num_classes=7)
    backbone = sum(p.numel() for p in model.backbone.parameters()) / 1e9
    assert backbone == pytest.approx(params_b, rel=0.05)
    assert all(p.is_meta for p in model.parameters())
    assert config.pos_embed_rescale is None  # deterministic forwards in train mode


def test_feature_layers_and_non_multiple_of_16_inputs_are_padded_not_floored():
    assert default_feature_layers(24) == [5, 11, 17, 23]
    assert default_feature_layers(40) == [9, 19, 29, 39]
    model = build_model(arch="dinov3", size="test", class_names=CLASSES, drop_path_rate=0.0).module.eval()
    image = torch.randn(1, 3, 50, 70)
    logits = model(pixel_values=image).logits
    assert logits.shape[-2:] == (13, 18)  # ceil(50 / 4), ceil(70 / 4)
    # the padded pixels are zeros: running the explicitly padded image gives the same logits
    padded = torch.nn.functional.pad(image, (0, 10, 0, 14))
    assert torch.allclose(model(pixel_values=padded).logits[..., :13, :18], logits, atol=1e-5)
    # train mode is deterministic too once stochastic depth and dropout are off (RoPE rescaling is off)
    model.train()
    model.head.dropout.p = 0.0
    with torch.no_grad():
        assert torch.equal(model(pixel_values=padded).logits, model(pixel_values=padded).logits)


def _zero3_config() -> dict:
    return fill_ds_config(read_ds_config("zero3_fp32"), micro_batch_size=1, grad_accum_steps=1, world_size=1,
                          grad_clip=1.0)


def test_zero3_construction_is_born_sharded_and_loads_the_saved_weights(tmp_path, one_process_world):
    source = build_model(arch="dinov3", size="test", class_names=CLASSES).module
    source.backbone.save_pretrained(tmp_path / "dinov3-test-pretrain-sat493m")
    # The directory name says satellite (SAT-493M): that decides the normalisation.
    built = build_model(arch="dinov3", size="test", class_names=CLASSES,
                        pretrained=str(tmp_path / "dinov3-test-pretrain-sat493m"),
                        ds_config=_zero3_config())
    params = dict(built.module.backbone.named_parameters())
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in params.values())
    expected = dict(source.backbone.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for name, param in params.items():
            assert torch.equal(param.data, expected[name].data), name


def test_a_backbone_checkpoint_with_missing_keys_is_an_error(tmp_path):
    source = build_model(arch="dinov3", size="test", class_names=CLASSES).module
    state = {k: v for k, v in source.backbone.state_dict().items() if ".layer.3." not in k}
    source.backbone.save_pretrained(tmp_path / "partial-sat493m", state_dict=state)
    with pytest.raises(DataError, match="backbone keys missing"):
        build_model(arch="dinov3", size="test", class_names=CLASSES, pretrained=str(tmp_path / "partial-sat493m"))


def test_dry_run_reports_the_7b_plan_without_materialising_it(capsys):
    spec = importlib.util.spec_from_file_location("finetune_script", REPO / "scripts" / "finetune.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--recipe", "dinov3_sat_vit7b_loveda", "--data-root", "/not/read", "--dry-run", "--cards", "8"])
    out = capsys.readouterr().out
    assert "of 6,72" in out and "75% of the backbone frozen" in out and "Recommended:" in out
    # A memory plan reads no data: the recipe (no data.root) needs none.
    script.main(["--recipe", "dinov3_sat_vitl_loveda", "--dry-run", "--cards", "8"])
    out = capsys.readouterr().out
    assert "root: null" in out and "Recommended:" in out


def test_weight_decay_split_is_the_same_for_zero3_shards(one_process_world):
    """ZeRO-3 parameters are empty 1-D shards; the decay split must use their real shapes."""
    reference = build_model(arch="dinov3", size="test", class_names=CLASSES).module
    expected = {n for g in build_param_groups(reference.named_parameters(), weight_decay=0.1)
                if g["weight_decay"] for n in g["names"]}
    sharded = build_model(arch="dinov3", size="test", class_names=CLASSES, ds_config=_zero3_config()).module
    groups = build_param_groups(sharded.named_parameters(), weight_decay=0.1)
    assert expected and {n for g in groups if g["weight_decay"] for n in g["names"]} == expected


# Run in a fresh process: a long-lived pytest worker has freed heap of earlier tests that the load may
# reuse, and then its private memory does not grow at all (seen in CI). Tensors above 64 KiB get pages
# of their own, returned when freed (glibc's mallopt, M_MMAP_THRESHOLD); a first load, dropped, takes
# the imports and caches out of the measured one.
_TEACHER_PROBE = """
import ctypes, gc, json, sys
import torch
from memprobe import PeakAnonymousMemory
from mapsage_ds.data.transforms import Normalize
from mapsage_ds.tasks.teacher import FrozenTeacher

ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)
normalize = Normalize(mean=(0.5,) * 3, std=(0.25,) * 3)
def load():
    return FrozenTeacher.load(sys.argv[1], input_normalize=normalize, device=torch.device("cpu"),
                              dtype=torch.bfloat16)
del_me = load(); del del_me; gc.collect()
with PeakAnonymousMemory() as peak:
    teacher = load()
print(json.dumps({"growth": peak.growth, "dtypes": sorted({str(p.dtype) for p in teacher.model.parameters()})}))
"""


def test_a_teacher_loads_in_bf16_without_an_fp32_copy(tmp_path):
    # 8 layers of width 512: 25 M parameters, 100 MB in fp32 — large enough to see a copy.
    config = dinov3_config("test")
    config.update({"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 8})
    model = DINOv3Segmenter(config, num_classes=len(LOVEDA_CLASSES))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fp32_bytes = sum(t.numel() * 4 for t in state.values())
    export = write_hf_export(model, state, tmp_path / "teacher", image_mean=(0.5,) * 3, image_std=(0.25,) * 3)

    result = subprocess.run([sys.executable, "-c", _TEACHER_PROBE, str(export)], cwd=REPO / "tests",
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe["dtypes"] == ["torch.bfloat16"]
    # The process's private memory grew by the bf16 weights (half the fp32 size) and no more: no
    # fp32 tensor of the model was ever allocated (the file is read through a shared mapping).
    assert 0.45 * fp32_bytes < probe["growth"] < 0.7 * fp32_bytes, (probe["growth"], fp32_bytes)


@pytest.mark.slow
def test_a_zero3_export_gathers_on_rank_0_and_rank_1_holds_one_tensor_at_a_time(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "tests" / "zero3_export_probe.py"), str(tmp_path)]
    # Every allocation above 64 KiB gets its own mapping, returned when freed: resident memory then
    # follows the tensors alive (glibc would otherwise serve them from pages freed earlier).
    env = {**subprocess_env(), "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(command, env=env, cwd=REPO / "tests", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    main, other = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(main["keys"]) == 24 and all(shape in ([1024, 1024], [1024]) for shape in main["shapes"].values())
    assert main["growth"] >= main["model_bytes"]  # rank 0 collects the whole model
    assert other["keys"] == []
    # Rank 1 took part in every gather but never kept more than about one tensor (+ allocator slack).
    assert other["growth"] < 3 * other["largest_tensor"] < other["model_bytes"] / 4, other
